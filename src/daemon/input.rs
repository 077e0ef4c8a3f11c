//! Input: store paths arrive as lines from a FIFO (kept open across senders), stdin or
//! a file, and from files `send` spooled while upload was away. Each read is split into
//! lines and parsed (see [`super::lines`]), recorded as accepted (see
//! [`super::accept`]) and passed on to the batcher (see [`super::batch`]).
//!
//! ```text
//! FIFO, stdin, file ─┬─▶ lines ─▶ store paths ─▶ accepted ─▶ batch
//! spool files ──────┘   (`!finish` is a command on a FIFO only)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lines::accept_frames;
use super::{Error, Shared};
use crate::pipe::{self, Frame, LineSplitter};
use crate::spool;
use crate::store_path::StorePath;

/// Where paths come from.
pub enum Input {
    Stdin,
    File(tokio::fs::File),
    /// Opened read-write so that senders coming and going never cause EOF.
    Fifo(tokio::net::unix::pipe::Receiver),
}

impl Input {
    /// `-` is stdin; a FIFO is kept open; anything else is read to EOF.
    pub async fn open(path: &str) -> Result<Input, Error> {
        if path == "-" {
            return Ok(Input::Stdin);
        }
        let err = |cause| Error::Input {
            path: path.to_string(),
            cause,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_fifo() {
            let rx = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(path)
                .map_err(err)?;
            Ok(Input::Fifo(rx))
        } else {
            Ok(Input::File(tokio::fs::File::open(path).await.map_err(err)?))
        }
    }
}

pub(super) async fn read(
    input: Input,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    drain: CancellationToken,
    input_done: CancellationToken,
) {
    let _done = input_done.drop_guard();
    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    match input {
        Input::Fifo(rx) => loop {
            let due = shared.rejects_due();
            tokio::select! {
                r = rx.readable() => if let Err(e) = r {
                    error!("reading the input pipe: {e}");
                    break;
                },
                _ = wake_at(due), if due.is_some() => {
                    shared.summarise_rejects(false);
                    continue;
                }
                _ = drain.cancelled() => {
                    // Take what senders already wrote, then stop.
                    while let Ok(n) = rx.try_read(&mut buf) {
                        if n == 0 { break; }
                        splitter.push(&buf[..n], &mut frames);
                    }
                    frames.extend(splitter.finish());
                    deliver(&shared, &mut frames, &tx).await;
                    return;
                }
            }
            match rx.try_read(&mut buf) {
                Ok(n) => splitter.push(&buf[..n], &mut frames),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    error!("reading the input pipe: {e}");
                    break;
                }
            }
            if !deliver(&shared, &mut frames, &tx).await {
                return;
            }
        },
        Input::Stdin => read_stream(tokio::io::stdin(), &shared, &tx, &drain, splitter, buf).await,
        Input::File(f) => read_stream(f, &shared, &tx, &drain, splitter, buf).await,
    }
}

async fn read_stream<R: AsyncRead + Unpin>(
    mut r: R,
    shared: &Shared,
    tx: &mpsc::Sender<Vec<StorePath>>,
    drain: &CancellationToken,
    mut splitter: LineSplitter,
    mut buf: Vec<u8>,
) {
    let mut frames = Vec::new();
    loop {
        let due = shared.rejects_due();
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = drain.cancelled() => return,
            _ = wake_at(due), if due.is_some() => {
                shared.summarise_rejects(false);
                continue;
            }
        };
        match n {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut frames),
            Err(e) => {
                error!("reading input: {e}");
                break;
            }
        }
        if !deliver(shared, &mut frames, tx).await {
            return;
        }
    }
    frames.extend(splitter.finish());
    deliver(shared, &mut frames, tx).await;
}

/// Sleeps until `due` (forever when None: guard the branch with `due.is_some()`).
async fn wake_at(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Parses frames into store paths, records them as accepted, and passes them on.
/// Returns false once `!finish` was seen (stop reading) or the daemon stopped.
async fn deliver(
    shared: &Shared,
    frames: &mut Vec<Frame>,
    tx: &mpsc::Sender<Vec<StorePath>>,
) -> bool {
    let (roots, finish) = accept_frames(shared, frames.drain(..), true);
    if !roots.is_empty() {
        shared.journal_accept(&roots).await;
        if tx.send(roots).await.is_err() {
            return false;
        }
    }
    !finish
}

const SPOOL_POLL: Duration = Duration::from_secs(1);

/// Picks up what `send` spooled while upload was away: at start, every second, and
/// once more when the input ends. A file is deleted only after its paths are recorded.
pub(super) async fn watch_spool(
    dir: PathBuf,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    input_done: CancellationToken,
) {
    loop {
        let files = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || spool::list(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match files {
            Ok(files) => {
                for f in files {
                    let data = match tokio::fs::read(&f).await {
                        Ok(d) => d,
                        Err(e) => {
                            warn!("cannot read spool file {}: {e}", f.display());
                            continue;
                        }
                    };
                    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
                    let mut frames = Vec::new();
                    splitter.push(&data, &mut frames);
                    frames.extend(splitter.finish());
                    let (roots, _) = accept_frames(&shared, frames.into_iter(), false);
                    info!("picked up {} paths spooled in {}", roots.len(), f.display());
                    if !roots.is_empty() {
                        if !shared.journal_accept(&roots).await {
                            continue; // keep the file: not recorded
                        }
                        if tx.send(roots).await.is_err() {
                            return;
                        }
                    }
                    if let Err(e) = tokio::fs::remove_file(&f).await {
                        warn!("cannot remove spool file {}: {e}", f.display());
                    }
                }
            }
            Err(e) => warn!("cannot list the spool {}: {e}", dir.display()),
        }
        if input_done.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(SPOOL_POLL) => {}
            _ = input_done.cancelled() => {}
        }
    }
}
