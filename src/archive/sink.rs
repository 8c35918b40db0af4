//! Where kept files end up: a local directory, or an S3-compatible bucket (through
//! `object_store`, not a hand-written S3 client).
//!
//! Either way a file is first downloaded to local disk with the resumable recipe of
//! [`super::download`] — into the archive directory itself, or for a bucket into a staging
//! directory next to the store — and only a whole, hashed file is then committed: for a bucket,
//! uploaded (a crash before the record commits leaves the staged file, which is uploaded again;
//! a PUT of the same bytes is idempotent), and the staged copy removed once the store has
//! recorded it as kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{ClientOptions, HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::assets::sanitize;
use super::download::{hash_file, hex, write_replacing};
use crate::config::{ArchiveConfig, S3Config};

/// Files up to this size go up in one PUT; larger ones in parts of this size, so memory stays
/// bounded whatever the file.
const PART: usize = 8 << 20;

/// An archive destination.
#[derive(Debug, Clone)]
pub enum Sink {
    /// `<dir>/<task_id>/<name>`.
    Dir(PathBuf),
    /// `s3://bucket/prefix/<task_id>/<name>`, staged locally first.
    S3(S3Sink),
}

/// A bucket and where its files are staged.
#[derive(Debug, Clone)]
pub struct S3Sink {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    staging: PathBuf,
}

/// Hands `object_store` sunopoll's own HTTP client: the bundled roots and the ring provider,
/// so a bucket over https needs no system CA bundle and no second TLS stack.
#[derive(Debug)]
struct Connector(reqwest::Client);

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// `access-key-id` and `secret-access-key` (or the AWS spellings `aws_access_key_id`,
/// `aws_secret_access_key`, and an optional session token) from a `key = value` file such as
/// `~/.aws/credentials`. Pure.
pub fn parse_credentials(text: &str) -> Result<(String, String, Option<String>), String> {
    let mut id = None;
    let mut secret = None;
    let mut token = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "access-key-id" | "aws-access-key-id" => id = Some(v),
            "secret-access-key" | "aws-secret-access-key" => secret = Some(v),
            "session-token" | "aws-session-token" => token = Some(v),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok((id, secret, token)),
        _ => Err("expected `access-key-id = …` and `secret-access-key = …` lines".to_owned()),
    }
}

impl Sink {
    /// The sink `[archive]` describes, with `http` for a bucket's requests.
    pub fn from_config(config: &ArchiveConfig, http: reqwest::Client) -> Result<Sink, String> {
        if let Some(dir) = &config.dir {
            return Ok(Sink::Dir(dir.clone()));
        }
        let Some(s3) = &config.s3 else {
            return Err("the archive is off".to_owned());
        };
        S3Sink::open(s3, http).map(Sink::S3)
    }

    /// Where a file is downloaded to before it is committed.
    pub fn local(&self, task: &str, name: &str) -> PathBuf {
        self.local_dir(task).join(sanitize(name))
    }

    /// The local directory of one task's files (the archive's own, or its staging).
    pub fn local_dir(&self, task: &str) -> PathBuf {
        let base = match self {
            Sink::Dir(dir) => dir,
            Sink::S3(s) => &s.staging,
        };
        base.join(sanitize(task))
    }

    /// The local directory whose free space bounds the downloads.
    pub fn local_root(&self) -> &Path {
        match self {
            Sink::Dir(dir) => dir,
            Sink::S3(s) => &s.staging,
        }
    }

    /// Where a kept file is, for people: a path, or an `s3://` URL.
    pub fn location(&self, task: &str, name: &str) -> String {
        match self {
            Sink::Dir(_) => self.local(task, name).display().to_string(),
            Sink::S3(s) => format!("s3://{}/{}", s.bucket, s.key(task, name)),
        }
    }

    /// Makes the downloaded file at `local` the kept one (a directory keeps it where it is).
    pub async fn commit(&self, task: &str, name: &str, local: &Path) -> std::io::Result<()> {
        match self {
            Sink::Dir(_) => Ok(()),
            Sink::S3(s) => s.upload(&s.key(task, name), local).await,
        }
    }

    /// After the store recorded a committed file: a bucket's staged copy is removed.
    pub async fn committed(&self, local: &Path) {
        if let Sink::S3(_) = self {
            let _ = tokio::fs::remove_file(local).await;
        }
    }

    /// Writes a task's manifest.
    pub async fn manifest(&self, task: &str, text: &str) -> std::io::Result<()> {
        let name = super::manifest::MANIFEST;
        match self {
            Sink::Dir(_) => write_replacing(&self.local(task, name), text).await,
            Sink::S3(s) => s
                .store
                .put(
                    &ObjectPath::from(s.key(task, name)),
                    PutPayload::from(text.to_owned()),
                )
                .await
                .map(|_| ())
                .map_err(std::io::Error::other),
        }
    }

    /// Size and SHA-256 of a kept file as it is now; `None` if it is gone.
    pub async fn verify(&self, task: &str, name: &str) -> std::io::Result<Option<(u64, String)>> {
        match self {
            Sink::Dir(_) => match hash_file(&self.local(task, name)).await {
                Ok(found) => Ok(Some(found)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Sink::S3(s) => {
                let got = match s.store.get(&ObjectPath::from(s.key(task, name))).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(std::io::Error::other(e)),
                };
                let mut stream = got.into_stream();
                let (mut size, mut hasher) = (0u64, Sha256::new());
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    size += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                Ok(Some((size, hex(&hasher.finalize()))))
            }
        }
    }

    /// Moves a damaged kept file aside (a bucket's is simply overwritten by the next upload).
    pub async fn set_aside(&self, task: &str, name: &str) -> std::io::Result<()> {
        match self {
            Sink::Dir(_) => {
                let path = self.local(task, name);
                let mut bad = path.clone().into_os_string();
                bad.push(".damaged");
                tokio::fs::rename(&path, &bad).await
            }
            Sink::S3(_) => Ok(()),
        }
    }
}

impl S3Sink {
    fn open(config: &S3Config, http: reqwest::Client) -> Result<S3Sink, String> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            .with_http_connector(Connector(http));
        if let Some(endpoint) = &config.endpoint {
            b = b.with_endpoint(endpoint.as_str());
        }
        if let Some(file) = &config.credentials_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "cannot read the archive's S3 credentials {}: {e}",
                    file.display()
                )
            })?;
            let (id, secret, token) = parse_credentials(&text)
                .map_err(|e| format!("the archive's S3 credentials {}: {e}", file.display()))?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = token {
                b = b.with_token(token);
            }
        }
        let store = b
            .build()
            .map_err(|e| format!("the archive's bucket: {e}"))?;
        Ok(S3Sink {
            store: Arc::new(store),
            bucket: config.bucket.clone(),
            prefix: config.prefix.trim_matches('/').to_owned(),
            staging: config.staging.clone(),
        })
    }

    fn key(&self, task: &str, name: &str) -> String {
        let rest = format!("{}/{}", sanitize(task), sanitize(name));
        if self.prefix.is_empty() {
            rest
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// Uploads `local` to `key`: one PUT when small, else parts read one at a time.
    async fn upload(&self, key: &str, local: &Path) -> std::io::Result<()> {
        let path = ObjectPath::from(key);
        let mut file = tokio::fs::File::open(local).await?;
        let len = file.metadata().await?.len();
        let other = std::io::Error::other;
        if len <= PART as u64 {
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut bytes).await?;
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(other)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await.map_err(other)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(2).await.map_err(other)?;
            w.write(&buf[..n]);
        }
        w.finish().await.map(|_| ()).map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_in_either_spelling() {
        let (id, secret, token) = parse_credentials(
            "[default]\naws_access_key_id = AK\naws_secret_access_key = \"SK\"\n",
        )
        .expect("aws spelling");
        assert_eq!((id.as_str(), secret.as_str(), token), ("AK", "SK", None));
        let (_, _, token) =
            parse_credentials("access-key-id=a\nsecret-access-key=b\nsession-token=t")
                .expect("ours");
        assert_eq!(token.as_deref(), Some("t"));
        assert!(parse_credentials("access-key-id = a").is_err());
    }
}
