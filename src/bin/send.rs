//! `send`: hand store paths to a running `upload` through its named pipe, instantly.
//!
//! ```text
//! send -o /run/narpipe.fifo $OUT_PATHS        # from Nix's post-build-hook
//! send -o /run/narpipe.fifo ./result
//! send -o /run/narpipe.fifo --finish          # ask upload to drain and exit
//! ```
//! Never waits longer than --timeout, never creates the pipe, never blocks on a
//! missing reader: a build must not hang on it. When upload is not there (no reader,
//! or the pipe stays full), the paths go to a new file in the spool directory, which
//! upload picks up when it runs, and send exits 0 with a warning. No async runtime, no
//! cache client.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use narpipe::pipe;
use narpipe::resolve::resolve_arg;
use narpipe::store_path::StoreDir;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{fstat, Mode, SFlag};

/// Send store paths to a running `upload --input PIPE`.
///
/// PATHs default to $OUT_PATHS (space-separated), or $DRV_PATH if that is empty, as
/// Nix sets them for a post-build-hook. Relative paths and symlinks such as ./result
/// are resolved here.
#[derive(Parser, Debug)]
#[command(version, name = "send")]
struct Args {
    /// The named pipe upload reads from.
    #[arg(short, long, env = "NARPIPE_PIPE")]
    output: PathBuf,

    /// Never wait longer than this many seconds for the pipe.
    #[arg(long, env = "NARPIPE_SEND_TIMEOUT", default_value_t = 5.0)]
    timeout: f64,

    /// After the paths, ask upload to finish its work and exit.
    #[arg(long)]
    finish: bool,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// Where paths go when upload cannot take them now (upload's STATE_DIR/spool).
    #[arg(
        long,
        env = "NARPIPE_SPOOL_DIR",
        default_value = "/var/lib/narpipe/spool"
    )]
    spool_dir: PathBuf,

    /// Store paths to upload.
    paths: Vec<String>,
}

fn paths_from_env() -> Vec<String> {
    let from = |var: &str| {
        std::env::var(var)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let out = from("OUT_PATHS");
    if out.is_empty() {
        from("DRV_PATH")
    } else {
        out
    }
}

/// Why the pipe could not take the paths.
enum Undelivered {
    /// Upload is not there or not keeping up: spool.
    Away(anyhow::Error),
    /// The path is not a pipe at all: a configuration error (still spooled).
    NotAPipe(anyhow::Error),
}

/// Opens the FIFO for writing without ever blocking: retries while no reader is there.
fn open_pipe(path: &Path, deadline: Instant) -> Result<OwnedFd, Undelivered> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        Undelivered::Away(anyhow::anyhow!(
            "no pipe at {shown} ({e}; is `upload --input {shown}` running?)"
        ))
    })?;
    if !meta.file_type().is_fifo() {
        return Err(Undelivered::NotAPipe(anyhow::anyhow!(
            "{shown} is not a named pipe; refusing to write to it"
        )));
    }
    open_fifo(path, deadline).map_err(Undelivered::Away)
}

fn open_fifo(path: &Path, deadline: Instant) -> Result<OwnedFd> {
    let shown = path.display();
    loop {
        let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match open(path, flags, Mode::empty()) {
            Ok(fd) => {
                let st = fstat(fd.as_fd()).context("fstat")?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
                    bail!("{shown} is not a named pipe; refusing to write to it");
                }
                return Ok(fd);
            }
            Err(Errno::ENXIO) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::ENXIO) => {
                bail!("no upload is reading {shown} (waited until the timeout)")
            }
            Err(Errno::EINTR) => {}
            Err(e) => bail!("cannot open {shown}: {e}"),
        }
    }
}

/// Writes one chunk (≤ PIPE_BUF, so all or nothing) waiting for room until `deadline`.
fn write_chunk(fd: &OwnedFd, chunk: &[u8], deadline: Instant, shown: &str) -> Result<()> {
    loop {
        match nix::unistd::write(fd, chunk) {
            Ok(n) if n == chunk.len() => return Ok(()),
            Ok(n) => bail!("short write of {n} of {} bytes to {shown}", chunk.len()),
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("{shown} stayed full until the timeout (is upload stuck?)");
                }
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                match poll(
                    &mut fds,
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                ) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => bail!("waiting for {shown}: {e}"),
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) => bail!("upload stopped reading {shown}"),
            Err(e) => bail!("writing to {shown}: {e}"),
        }
    }
}

/// Writes the chunks; returns how many went through before an error.
fn write_all(
    fd: &OwnedFd,
    chunks: &[Vec<u8>],
    deadline: Instant,
    shown: &str,
) -> (usize, Result<()>) {
    for (i, chunk) in chunks.iter().enumerate() {
        if let Err(e) = write_chunk(fd, chunk, deadline, shown) {
            return (i, Err(e));
        }
    }
    (chunks.len(), Ok(()))
}

/// Leaves the lines not delivered in the spool; the build goes on.
fn spool(args: &Args, lines: &[String], why: &anyhow::Error) -> Result<()> {
    let paths: Vec<String> = lines
        .iter()
        .filter(|l| l.as_bytes() != pipe::FINISH)
        .cloned()
        .collect();
    if paths.is_empty() {
        eprintln!("send: warning: {why:#}; nothing to spool");
        return Ok(());
    }
    let file = narpipe::spool::write(&args.spool_dir, &paths).with_context(|| {
        format!(
            "{why:#}; and cannot spool {} paths into {}",
            paths.len(),
            args.spool_dir.display()
        )
    })?;
    eprintln!(
        "send: warning: {why:#}; {} paths spooled to {} for upload to pick up",
        paths.len(),
        file.display()
    );
    Ok(())
}

fn run(args: Args) -> Result<bool> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout.max(0.0));
    let store_dir = StoreDir::new(&args.store_dir).context("--store-dir")?;
    let inputs = if args.paths.is_empty() {
        paths_from_env()
    } else {
        args.paths.clone()
    };
    let mut all_valid = true;
    let mut lines: Vec<String> = Vec::new();
    for input in &inputs {
        match resolve_arg(input, &store_dir) {
            Ok(p) => lines.push(store_dir.display(&p)),
            Err(e) => {
                eprintln!("send: skipping {e}");
                all_valid = false;
            }
        }
    }
    if args.finish {
        lines.push(String::from_utf8_lossy(pipe::FINISH).into_owned());
    }
    if lines.is_empty() {
        if inputs.is_empty() {
            eprintln!("send: nothing to send (no PATH arguments, $OUT_PATHS and $DRV_PATH empty)");
        }
        return Ok(all_valid);
    }
    let chunks = pipe::pack(&lines)?;
    let shown = args.output.display().to_string();
    let fd = match open_pipe(&args.output, deadline) {
        Ok(fd) => fd,
        Err(Undelivered::Away(why)) => {
            spool(&args, &lines, &why)?;
            return Ok(all_valid);
        }
        Err(Undelivered::NotAPipe(why)) => {
            spool(&args, &lines, &why)?;
            return Err(why);
        }
    };
    let (sent, result) = write_all(&fd, &chunks, deadline, &shown);
    if let Err(why) = result {
        // Whole chunks are atomic: the lines of the chunks not written are spooled.
        let rest: Vec<String> = chunks[sent..]
            .iter()
            .flat_map(|c| {
                String::from_utf8_lossy(c)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        spool(&args, &rest, &why)?;
    }
    Ok(all_valid)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("send: {e:#}");
            ExitCode::from(1)
        }
    }
}
