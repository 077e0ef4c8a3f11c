//! `upload`: push store paths and their closures into a binary cache.
//!
//! ```text
//! nix-store -qR ./result | upload file:///srv/cache
//! upload --input /run/narpipe.fifo --secret-key-file /etc/nix/cache.sk file:///srv/cache
//! ```
//! Exit codes: 0 every accepted path is in the cache; 1 some failed (or input was
//! rejected, or a stop left work unfinished); 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use narpipe::cache::Cache;
use narpipe::compress::Compression;
use narpipe::daemon::{self, Config, Input, Shutdown};
use narpipe::signing::SecretKey;
use narpipe::store_path::StoreDir;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Upload Nix store paths, with their closures, to a binary cache.
///
/// Reads store paths (or .drv paths, or symlinks into the store) one per line. A FIFO
/// input is kept open while `send` calls come and go; stdin or a file is read to its
/// end. SIGHUP or `send --finish`: finish what was sent, then exit. SIGINT/SIGTERM:
/// stop promptly.
#[derive(Parser, Debug)]
#[command(version, name = "upload")]
struct Args {
    /// The cache: file:///abs/dir or a plain absolute path.
    #[arg(env = "NARPIPE_CACHE")]
    cache_url: String,

    /// Where store paths come from, one per line: "-" for stdin, a file, or a FIFO.
    #[arg(short, long, env = "NARPIPE_INPUT", default_value = "-")]
    input: String,

    /// A Nix secret key (name:base64, from `nix-store --generate-binary-cache-key`);
    /// repeat for several keys, each adds a Sig. In the environment: comma-separated.
    #[arg(long, env = "NARPIPE_SECRET_KEY_FILE", value_delimiter = ',')]
    secret_key_file: Vec<PathBuf>,

    /// NAR compression: zstd, xz or none.
    #[arg(long, env = "NARPIPE_COMPRESSION", default_value = "zstd")]
    compression: Compression,

    /// Compression level (zstd 1–19, xz 0–9); default: the algorithm's own.
    #[arg(long, env = "NARPIPE_COMPRESSION_LEVEL", allow_negative_numbers = true)]
    compression_level: Option<i32>,

    /// Paths uploaded at once (default: number of CPUs).
    #[arg(short, long, env = "NARPIPE_JOBS")]
    jobs: Option<usize>,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// Priority written to a new nix-cache-info (lower is preferred by Nix).
    #[arg(long, env = "NARPIPE_PRIORITY", default_value_t = 40)]
    priority: u32,

    /// Where accepted paths are recorded until they are in the cache (default:
    /// $STATE_DIRECTORY, else /var/lib/narpipe). Always used when reading a FIFO; for
    /// stdin or a file only when given.
    #[arg(long, env = "NARPIPE_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Where `send` leaves paths while upload is down (default: STATE_DIR/spool).
    #[arg(long, env = "NARPIPE_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,

    /// Attempts per path before it is reported failed (and kept for the next start).
    #[arg(long, env = "NARPIPE_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
}

const DEFAULT_STATE_DIR: &str = "/var/lib/narpipe";

/// The state directory: the option, else systemd's $STATE_DIRECTORY (first entry),
/// else the default when `needed`.
fn state_dir(args: &Args, needed: bool) -> Option<PathBuf> {
    args.state_dir
        .clone()
        .or_else(|| {
            std::env::var("STATE_DIRECTORY").ok().and_then(|v| {
                v.split(':')
                    .next()
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
            })
        })
        .or_else(|| needed.then(|| PathBuf::from(DEFAULT_STATE_DIR)))
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let prefix = match r.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        eprintln!("{prefix}{}", r.args());
    }
    fn flush(&self) {}
}

fn config(args: &Args) -> Result<Config> {
    let store_dir = StoreDir::new(&args.store_dir).context("--store-dir")?;
    let cache = Cache::open(&args.cache_url)?;
    let mut keys = Vec::new();
    for file in &args.secret_key_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read secret key file {}", file.display()))?;
        let key: SecretKey = text
            .parse()
            .with_context(|| format!("secret key file {}", file.display()))?;
        keys.push(key);
    }
    if let (Some(level), Compression::Zstd) = (args.compression_level, args.compression) {
        anyhow::ensure!(
            (1..=19).contains(&level),
            "--compression-level {level}: zstd takes 1–19"
        );
    }
    if let (Some(level), Compression::Xz) = (args.compression_level, args.compression) {
        anyhow::ensure!(
            (0..=9).contains(&level),
            "--compression-level {level}: xz takes 0–9"
        );
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
    Ok(Config {
        cache,
        store_dir,
        keys,
        compression: args.compression,
        level: args.compression_level,
        jobs,
        priority: args.priority,
        journal: None,
        pending: Vec::new(),
        spool_dir: None,
        max_attempts: args.max_attempts,
    })
}

/// Turns signals into the daemon's shutdown value. A second SIGINT/SIGTERM exits at once.
fn watch_signals(shutdown: Shutdown) -> Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if sig == SIGHUP {
                log::info!("SIGHUP: finishing what was sent, then exiting");
                shutdown.drain.cancel();
            } else if shutdown.stop.is_cancelled() {
                std::process::exit(130);
            } else {
                log::info!("stopping; unfinished uploads are abandoned");
                shutdown.drain.cancel();
                shutdown.stop.cancel();
            }
        }
    });
    Ok(())
}

async fn start(args: &Args) -> Result<(Config, Input)> {
    let mut cfg = config(args)?;
    let input = Input::open(&args.input).await?;
    if let Some(dir) = state_dir(args, matches!(input, Input::Fifo(_))) {
        let (journal, pending) = daemon::open_journal(&dir)?;
        if !pending.is_empty() {
            log::info!("{} paths pending in {}", pending.len(), dir.display());
        }
        cfg.journal = Some(journal);
        cfg.pending = pending;
        cfg.spool_dir = Some(args.spool_dir.clone().unwrap_or_else(|| dir.join("spool")));
    }
    daemon::prepare(&cfg).await?;
    Ok((cfg, input))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = log::set_logger(&Logger).map(|()| log::set_max_level(log::LevelFilter::Info));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        let (cfg, input) = match start(&args).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        };
        let shutdown = Shutdown::default();
        if let Err(e) = watch_signals(shutdown.clone()) {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
        let summary = daemon::run(cfg, input, shutdown).await;
        log::info!("summary: {summary}");
        if summary.all_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    });
    // A NAR reader still on a blocking thread stops at its next chunk; don't wait longer.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
