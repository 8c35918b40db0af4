//! Routing: which handlers a task's events go to, decided once when the events are stored.

use std::sync::{Arc, RwLock};

use crate::config::{ForwardConfig, TargetConfig};
use crate::events::Stage;
use crate::store::{Route, TargetSpec, TaskRow};
use crate::store::{TARGET_SUBMITTED_URL, TARGET_TASK_URL};

/// Decides where a task's events go. Built from `[forward]` at start; clones share it, so a
/// reload ([`Router::replace`]) reaches every part that routes or delivers.
#[derive(Debug, Clone)]
pub struct Router {
    config: Arc<RwLock<Arc<ForwardConfig>>>,
}

impl Router {
    /// A router for `config`.
    pub fn new(config: ForwardConfig) -> Router {
        Router {
            config: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    /// The forward settings now.
    pub fn config(&self) -> Arc<ForwardConfig> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Routes and delivers by `config` from now on (a reload): new events go to its targets,
    /// and pending deliveries are signed with its secrets.
    pub fn replace(&self, config: ForwardConfig) {
        let config = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    /// The configured targets as routes.
    pub fn configured_routes(&self) -> Vec<Route> {
        self.config().targets.iter().map(route_of).collect()
    }

    /// The configured targets as a shared queue registers them (see
    /// [`crate::store::Store::fail_orphans`]).
    pub fn target_specs(&self) -> Vec<TargetSpec> {
        self.config()
            .targets
            .iter()
            .map(|t| TargetSpec {
                route: route_of(t),
                kinds: t.kinds.clone(),
            })
            .collect()
    }

    /// Where `task`'s new events go: the configured targets, its `--callback-url`, and, with
    /// `use-task-callback-url`, the URL it was submitted with if that URL's host is allowed.
    /// A URL already routed to (a configured target, or the `--callback-url`) is not added a
    /// second time: the handler would get every event twice under two `webhook-id`s.
    pub fn routes(&self, task: &TaskRow, submitted: Option<&str>) -> Vec<Route> {
        let mut routes: Vec<Route> = self
            .config()
            .targets
            .iter()
            .filter(|t| t.takes_kind(task.kind))
            .map(route_of)
            .collect();
        let same = |a: &str, b: &str| match (url::Url::parse(a), url::Url::parse(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        let mut add = |target: &str, url: &str| {
            if !routes.iter().any(|r| same(&r.url, url)) {
                routes.push(Route {
                    target: target.to_owned(),
                    url: url.to_owned(),
                    stages: Stage::ALL.to_vec(),
                });
            }
        };
        if let Some(url) = &task.callback_url {
            add(TARGET_TASK_URL, url);
        }
        if self.config().use_task_callback_url
            && let Some(url) = submitted.or(task.submitted_callback_url.as_deref())
            && self.submitted_url_allowed(url)
        {
            add(TARGET_SUBMITTED_URL, url);
        }
        routes
    }

    /// Where the `archived` notification of a task of `kind` goes: the configured targets that
    /// list `archived` in their `stages` and take the kind. Never a task's own callback URLs:
    /// they stand for the API's callbacks, and this is no callback.
    pub fn archived_routes(&self, kind: crate::api::families::Kind) -> Vec<Route> {
        self.config()
            .targets
            .iter()
            .filter(|t| t.stages.contains(&Stage::Archived) && t.takes_kind(kind))
            .map(route_of)
            .collect()
    }

    /// True when a submitted `callBackUrl` may be used: http(s) and a host in `allow-hosts`.
    pub fn submitted_url_allowed(&self, url: &str) -> bool {
        url::Url::parse(url).is_ok_and(|u| {
            (u.scheme() == "http" || u.scheme() == "https") && self.config().allows_host(&u)
        })
    }

    /// The configured target called `name`.
    pub fn target(&self, name: &str) -> Option<TargetConfig> {
        self.config()
            .targets
            .iter()
            .find(|t| t.name == name)
            .cloned()
    }
}

/// The route to configured target `t`: its name, URL and stages.
fn route_of(t: &TargetConfig) -> Route {
    Route {
        target: t.name.clone(),
        url: t.url.to_string(),
        stages: t.stages.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_url_is_routed_to_once() {
        let mut config =
            crate::config::Config::defaults(&crate::config::Environment::default()).forward;
        config.use_task_callback_url = true;
        config.targets.push(TargetConfig {
            name: "app".into(),
            url: url::Url::parse("http://127.0.0.1:3000/cb").expect("url"),
            stages: vec![Stage::Complete],
            secret: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
            kinds: None,
        });
        let router = Router::new(config);
        let task = TaskRow {
            id: "t".into(),
            kind: crate::api::families::Kind::Music,
            account: "default".into(),
            state: crate::store::TaskState::Active,
            stage: None,
            last_status: None,
            failures: 0,
            rejections: 0,
            added_at: 0,
            deadline_at: 1,
            callback_url: Some("http://127.0.0.1:3000/cb".into()),
            submitted_callback_url: None,
            asked: crate::store::Asked::default(),
        };
        let routes = router.routes(&task, Some("http://127.0.0.1:3000/other"));
        let targets: Vec<&str> = routes.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(
            targets,
            ["app", TARGET_SUBMITTED_URL],
            "the --callback-url equals the target's URL"
        );
        let routes = router.routes(&task, Some("http://127.0.0.1:3000/cb"));
        assert_eq!(routes.len(), 1);
        assert!(
            routes.iter().all(|r| !r.stages.contains(&Stage::Archived)),
            "a task's own URLs never get the archived notification"
        );
    }

    #[test]
    fn archived_goes_only_to_targets_that_list_it_and_take_the_kind() {
        use crate::api::families::Kind;
        let mut config =
            crate::config::Config::defaults(&crate::config::Environment::default()).forward;
        let target = |name: &str, stages: Vec<Stage>, kinds: Option<Vec<Kind>>| TargetConfig {
            name: name.into(),
            url: url::Url::parse(&format!("http://127.0.0.1:3000/{name}")).expect("url"),
            stages,
            secret: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
            kinds,
        };
        config.targets = vec![
            target("all", Stage::ALL.to_vec(), None),
            target("files", vec![Stage::Complete, Stage::Archived], None),
            target("wav-files", vec![Stage::Archived], Some(vec![Kind::Wav])),
        ];
        let router = Router::new(config);
        let names = |kind| -> Vec<String> {
            router
                .archived_routes(kind)
                .into_iter()
                .map(|r| r.target)
                .collect()
        };
        assert_eq!(names(Kind::Music), ["files"]);
        assert_eq!(names(Kind::Wav), ["files", "wav-files"]);
    }
}
