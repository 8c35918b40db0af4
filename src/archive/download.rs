//! One file onto disk, so that a kill at any moment leaves either the finished file or a
//! `.part` that the next try resumes.
//!
//! The body streams to `<name>.part`, hashed (SHA-256) as it goes. A try that finds a `.part`
//! and knows the first answer's validator (its `ETag`, else `Last-Modified`, stored before any
//! byte was written) asks for the rest with `Range: bytes=N-` and `If-Range`; a `206` whose
//! `Content-Range` starts at N is appended, and anything else — a `200` (the server ignores
//! ranges, or the file changed) — starts the file again from zero: the part is truncated,
//! never appended to (rustup#4710 corrupted files that way). A finished part is fsynced,
//! renamed into place and its directory fsynced, so a finished name is always a whole file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long one read of the body may take before the try is given up (and resumed later).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a try did not finish the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// 403, 404 or 410: not there (yet, or any more: the caller knows which by the date).
    #[error("HTTP {0}: the file is not there")]
    Missing(u16),
    /// Another status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The connection or the body failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Larger than `max-file-size`.
    #[error("the file is larger than max-file-size ({limit} bytes)")]
    TooBig {
        /// The limit.
        limit: u64,
    },
    /// Writing it locally failed.
    #[error("local I/O: {0}")]
    Io(String),
}

impl From<std::io::Error> for FetchError {
    fn from(e: std::io::Error) -> Self {
        FetchError::Io(e.to_string())
    }
}

/// A finished file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Bytes that were already in the `.part` and kept (0: fetched whole).
    pub resumed_from: u64,
}

/// A byte-rate cap shared by every download: a token bucket holding at most one second of
/// tokens, which a chunk may overdraw (the next chunk then waits out the debt).
#[derive(Debug)]
pub struct Bandwidth {
    rate: Option<u64>,
    state: Mutex<(f64, Instant)>,
}

impl Bandwidth {
    /// A cap of `rate` bytes per second (`None`: no cap).
    pub fn new(rate: Option<u64>) -> Bandwidth {
        Bandwidth {
            rate: rate.filter(|r| *r > 0),
            state: Mutex::new((rate.unwrap_or(0) as f64, Instant::now())),
        }
    }

    /// How long to wait before `n` more bytes may be used, at `now`; counts them. Pure apart
    /// from the bucket itself.
    pub fn take_at(&self, n: usize, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.saturating_duration_since(s.1).as_secs_f64() * rate;
        s.0 = (s.0 + refill).min(rate) - n as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / rate)
        }
    }

    /// Waits until `n` more bytes may be used.
    pub async fn take(&self, n: usize) {
        let wait = self.take_at(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `e` with its causes ("error following redirect: …: redirected to a refused host …"),
/// credentials cut out of any URL in it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    crate::api::redact_url(&text)
}

/// The `.part` next to `dest`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut p = dest.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and SHA-256 of the file at `path`, read in chunks.
pub async fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = tokio::fs::File::open(path).await?;
    let (size, hasher) = hash_prefix(&mut f, u64::MAX).await?;
    Ok((size, hex(&hasher.finalize())))
}

/// Hashes up to `limit` bytes from the start of `f`.
async fn hash_prefix(f: &mut tokio::fs::File, limit: u64) -> std::io::Result<(u64, Sha256)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    while total < limit {
        let want = usize::try_from((limit - total).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher))
}

/// Fsyncs `dir`, so a rename inside it survives a power cut.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

/// Moves a finished, fsynced `part` to `dest` and fsyncs the directory.
async fn finish(part: &Path, dest: &Path) -> std::io::Result<()> {
    tokio::fs::rename(part, dest).await?;
    match dest.parent() {
        Some(dir) => sync_dir(dir).await,
        None => Ok(()),
    }
}

/// What a file that is already in place is: a finished name is only ever a whole file
/// (renamed after fsync), so one found there was kept by a try whose record did not commit.
pub async fn already_kept(dest: &Path) -> Option<Fetched> {
    let (size, sha256) = hash_file(dest).await.ok()?;
    Some(Fetched {
        size,
        sha256,
        resumed_from: size,
    })
}

/// Writes `text` to `dest` the same way a download ends: part, fsync, rename, fsync dir.
pub async fn write_inline(dest: &Path, text: &str) -> Result<Fetched, FetchError> {
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let part = part_path(dest);
    let mut f = tokio::fs::File::create(&part).await?;
    f.write_all(text.as_bytes()).await?;
    f.sync_all().await?;
    drop(f);
    finish(&part, dest).await?;
    Ok(Fetched {
        size: text.len() as u64,
        sha256: hex(&Sha256::digest(text.as_bytes())),
        resumed_from: 0,
    })
}

/// Writes `text` to `dest` as [`write_inline`] does, through a part file of its own, for a file
/// that two tries may write at once: a task's manifest, when its last two files are kept at the
/// same moment. With one shared part name, the second writer's rename finds the part already
/// moved away (and could move a half-written one); with one each, every rename puts a whole
/// file in place, and the last one stays (both list the same files).
pub async fn write_replacing(dest: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut part = dest.as_os_str().to_owned();
    part.push(format!(
        ".{}-{:08x}.part",
        std::process::id(),
        fastrand::u32(..)
    ));
    let part = PathBuf::from(part);
    let written = async {
        let mut f = tokio::fs::File::create(&part).await?;
        f.write_all(text.as_bytes()).await?;
        f.sync_all().await?;
        drop(f);
        finish(&part, dest).await
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    written
}

/// What [`fetch`] needs besides the URL and the destination.
pub struct Limits<'a> {
    /// The shared byte-rate cap.
    pub bandwidth: &'a Bandwidth,
    /// The largest file accepted.
    pub max_file_size: u64,
}

/// Downloads `url` to `dest` (see the module docs). `validator` is the one stored from the
/// first answer; `store_validator` is called with a fresh answer's validator before its body
/// is written (so a kill mid-body can resume), and must succeed for the body to be written.
pub async fn fetch<S, Fut>(
    http: &reqwest::Client,
    url: &url::Url,
    dest: &Path,
    validator: Option<&str>,
    limits: &Limits<'_>,
    store_validator: S,
) -> Result<Fetched, FetchError>
where
    S: FnOnce(Option<String>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let part = part_path(dest);
    let have = match tokio::fs::metadata(&part).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    let mut request = http.get(url.clone());
    let resuming = match validator {
        Some(v) if have > 0 => {
            request = request
                .header(RANGE, format!("bytes={have}-"))
                .header(IF_RANGE, v);
            true
        }
        _ => false,
    };
    let mut response = request
        .send()
        .await
        .map_err(|e| FetchError::Transport(chain(&e)))?;
    let status = response.status();
    let offset = match status {
        StatusCode::PARTIAL_CONTENT if resuming => {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !range.starts_with(&format!("bytes {have}-")) {
                // Not the rest of our part: start again from zero on the next try.
                let _ = tokio::fs::remove_file(&part).await;
                return Err(FetchError::Transport(format!(
                    "asked for bytes {have}- and got Content-Range {range:?}"
                )));
            }
            have
        }
        StatusCode::OK => 0,
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(FetchError::Status(416));
        }
        StatusCode::FORBIDDEN | StatusCode::NOT_FOUND | StatusCode::GONE => {
            return Err(FetchError::Missing(status.as_u16()));
        }
        s => return Err(FetchError::Status(s.as_u16())),
    };
    let length = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|l| offset.saturating_add(l) > limits.max_file_size) {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(FetchError::TooBig {
            limit: limits.max_file_size,
        });
    }
    if offset == 0 {
        // A fresh body: its validator is what a resume must name. Weak ETags cannot be used
        // with If-Range, so those fall back to Last-Modified.
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let fresh = header(ETAG)
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| header(LAST_MODIFIED));
        store_validator(fresh).await.map_err(FetchError::Io)?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&part)
        .await?;
    let mut hasher = if offset > 0 {
        let (read, hasher) = hash_prefix(&mut file, offset).await?;
        if read != offset {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(FetchError::Io(format!(
                "the part shrank to {read} of {offset} bytes while resuming"
            )));
        }
        hasher
    } else {
        Sha256::new()
    };
    // Truncate to what is kept: a 200 starts from zero, a 206 from the end of the part.
    file.set_len(offset).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut size = offset;
    loop {
        let chunk = match tokio::time::timeout(READ_TIMEOUT, response.chunk()).await {
            Err(_) => {
                file.sync_all().await?;
                return Err(FetchError::Transport(format!(
                    "no data for {}s",
                    READ_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => {
                // Keep what arrived: the next try resumes after it.
                file.sync_all().await?;
                return Err(FetchError::Transport(chain(&e)));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        size = size.saturating_add(chunk.len() as u64);
        if size > limits.max_file_size {
            drop(file);
            let _ = tokio::fs::remove_file(&part).await;
            return Err(FetchError::TooBig {
                limit: limits.max_file_size,
            });
        }
        limits.bandwidth.take(chunk.len()).await;
        file.write_all(&chunk).await?;
        hasher.update(&chunk);
    }
    if let Some(l) = length
        && size != offset.saturating_add(l)
    {
        file.sync_all().await?;
        return Err(FetchError::Transport(format!(
            "the body ended after {size} bytes of {}",
            offset.saturating_add(l)
        )));
    }
    file.flush().await?;
    file.sync_all().await?;
    drop(file);
    finish(&part, dest).await?;
    Ok(Fetched {
        size,
        sha256: hex(&hasher.finalize()),
        resumed_from: offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task's last two files kept at once both write its manifest: each must succeed and
    /// leave a whole file, and no part file behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_written_at_once_each_put_a_whole_file_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("task").join("manifest.json");
        let texts: Vec<String> = (0..8).map(|i| format!("{{\"writer\":{i}}}")).collect();
        let writes: Vec<_> = texts
            .iter()
            .map(|t| {
                let (dest, t) = (dest.clone(), t.clone());
                tokio::spawn(async move { write_replacing(&dest, &t).await })
            })
            .collect();
        for w in writes {
            w.await.expect("join").expect("every write succeeds");
        }
        let kept = std::fs::read_to_string(&dest).expect("kept");
        assert!(texts.contains(&kept), "a whole file: {kept:?}");
        let left: Vec<_> = std::fs::read_dir(dest.parent().expect("dir"))
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["manifest.json"], "no part file left");
    }

    #[test]
    fn the_bucket_lets_a_second_through_then_paces() {
        let b = Bandwidth::new(Some(1000));
        let t = Instant::now();
        assert_eq!(b.take_at(1000, t), Duration::ZERO, "one second of burst");
        assert_eq!(b.take_at(500, t), Duration::from_millis(500));
        assert_eq!(
            b.take_at(500, t + Duration::from_millis(500)),
            Duration::from_millis(500),
            "the debt is paid back at the rate"
        );
        let free = Bandwidth::new(None);
        assert_eq!(free.take_at(usize::MAX, t), Duration::ZERO);
    }

    #[tokio::test]
    async fn an_inline_file_is_written_whole_with_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("t").join("lyrics.json");
        let f = write_inline(&dest, "{\"a\":1}").await.expect("write");
        assert_eq!(std::fs::read(&dest).expect("read"), b"{\"a\":1}");
        assert_eq!(f.size, 7);
        assert_eq!(
            f.sha256,
            hex(&Sha256::digest(b"{\"a\":1}")),
            "the hash of the bytes on disk"
        );
        assert!(!part_path(&dest).exists());
        assert_eq!(already_kept(&dest).await.map(|k| k.sha256), Some(f.sha256));
    }
}
