//! The parts of the process environment that configuration depends on, captured once in `main`,
//! and the default store and socket paths they imply (systemd directories, XDG, root).

use std::path::{Path, PathBuf};

use super::{SOCKET_FILE, STORE_FILE, SYSTEM_SOCKET};

/// The parts of the process environment that configuration depends on.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// The effective user id (0 for root).
    pub uid: u32,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_STATE_HOME`.
    pub xdg_state_home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`).
    pub state_directory: Option<PathBuf>,
    /// `$RUNTIME_DIRECTORY` (systemd `RuntimeDirectory=`).
    pub runtime_directory: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
    /// `$SUNO_API_KEY`.
    pub suno_api_key: Option<String>,
    /// `$SUNO_API_KEY_<NAME>` of each named account, by variable name.
    pub account_keys: std::collections::BTreeMap<String, String>,
}

impl Environment {
    /// Reads the real process environment. Called once, in `main`.
    pub fn from_process() -> Environment {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        // systemd may pass several directories separated by ':'; the first is ours.
        let first = |p: Option<PathBuf>| {
            p.map(|p| {
                let s = p.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or_default())
            })
        };
        Environment {
            uid: current_uid(),
            home: path("HOME"),
            xdg_state_home: path("XDG_STATE_HOME"),
            xdg_runtime_dir: path("XDG_RUNTIME_DIR"),
            state_directory: first(path("STATE_DIRECTORY")),
            runtime_directory: first(path("RUNTIME_DIRECTORY")),
            credentials_directory: path("CREDENTIALS_DIRECTORY"),
            suno_api_key: std::env::var("SUNO_API_KEY").ok().filter(|v| !v.is_empty()),
            account_keys: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, v)| k.starts_with("SUNO_API_KEY_") && !v.is_empty())
                .collect(),
        }
    }

    /// The value of the key variable `name` (`SUNO_API_KEY` or `SUNO_API_KEY_<NAME>`).
    pub fn api_key_var(&self, name: &str) -> Option<String> {
        if name == "SUNO_API_KEY" {
            self.suno_api_key.clone()
        } else {
            self.account_keys.get(name).cloned()
        }
    }

    /// The store path used when the config names none.
    pub fn default_store_path(&self) -> PathBuf {
        if let Some(dir) = &self.state_directory {
            return dir.join(STORE_FILE);
        }
        if self.uid == 0 {
            return PathBuf::from("/var/lib/sunopoll").join(STORE_FILE);
        }
        let base = self
            .xdg_state_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".local/state")))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/sunopoll-{}", self.uid)));
        base.join("sunopoll").join(STORE_FILE)
    }

    /// The socket path used when the config names none.
    pub fn default_socket_path(&self) -> PathBuf {
        if let Some(dir) = &self.runtime_directory {
            return dir.join(SOCKET_FILE);
        }
        if self.uid == 0 {
            return PathBuf::from(SYSTEM_SOCKET);
        }
        match &self.xdg_runtime_dir {
            Some(dir) => dir.join(SOCKET_FILE),
            None => private_tmp_dir(self.uid).join(SOCKET_FILE),
        }
    }
}

/// The per-user directory in `/tmp` that holds the socket when there is no runtime directory.
/// `/tmp` is shared: another user may have created it first to catch the socket, so whoever
/// uses it checks it with [`check_private_dir`] (as ssh-agent and tmux do theirs).
pub fn private_tmp_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/sunopoll-{uid}"))
}

/// What is wrong with `dir` as `uid`'s private socket directory, from its `lstat`: it must be a
/// real directory (not a symlink), owned by `uid`, and not writable by group or others (who
/// could otherwise move the socket aside and put their own in its place).
pub fn judge_private_dir(
    dir: &Path,
    is_dir: bool,
    owner: u32,
    mode: u32,
    uid: u32,
) -> Result<(), String> {
    let problem = if !is_dir {
        Some("it is not a directory (a symlink, or a file)".to_owned())
    } else if owner != uid {
        Some(format!("it does not belong to uid {uid}"))
    } else if mode & 0o022 != 0 {
        Some("other users can write it".to_owned())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(format!(
            "refusing the socket directory {} (owner uid {owner}, mode {:04o}): {why}; another user may have created it to intercept the socket — remove it, or set $XDG_RUNTIME_DIR or [control] socket",
            dir.display(),
            mode & 0o7777
        )),
    }
}

/// Checks `dir` as `uid`'s private socket directory (see [`judge_private_dir`]), without
/// following a symlink.
pub fn check_private_dir(dir: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect the socket directory {}: {e}", dir.display()))?;
    judge_private_dir(dir, meta.file_type().is_dir(), meta.uid(), meta.mode(), uid)
}

/// The effective uid, read without `unsafe`: `/proc/self` is owned by the process's user.
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}
