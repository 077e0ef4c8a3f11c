//! `upload`: push store paths and their closures into a binary cache.
//!
//! ```text
//! nix-store -qR ./result | upload file:///srv/cache
//! upload --input /run/narpipe.fifo --secret-key-file /etc/nix/cache.sk s3://bucket
//! upload verify s3://bucket --trusted-public-key cache-1:…
//! ```
//! Exit codes: 0 every accepted path is in the cache; 1 some failed (or input was
//! rejected, or a stop left work unfinished; for verify: problems found); 2 usage or
//! configuration error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use narpipe::cache::Cache;
use narpipe::compress::Compression;
use narpipe::daemon::{self, Config, Input, Shutdown};
use narpipe::filter::Filter;
use narpipe::signing::{PublicKey, SecretKey};
use narpipe::stats::{human, Stats};
use narpipe::store_path::StoreDir;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Upload Nix store paths, with their closures, to a binary cache.
///
/// Reads store paths (or .drv paths, or symlinks into the store) one per line. A FIFO
/// input is kept open while `send` calls come and go; stdin or a file is read to its
/// end. SIGHUP or `send --finish`: finish what was sent, then exit. SIGINT/SIGTERM:
/// stop promptly (accepted paths resume on the next start).
#[derive(Parser, Debug)]
#[command(
    version,
    name = "upload",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a cache: every narinfo's NAR exists with its size, its references have
    /// narinfos, and (with keys) a signature verifies. Exit 1 if anything is broken.
    Verify {
        /// The cache to check (same URL forms as for uploading).
        cache_url: String,
        /// A public key (name:base64) whose signatures are trusted; repeatable.
        #[arg(
            long = "trusted-public-key",
            env = "NARPIPE_TRUSTED_PUBLIC_KEYS",
            value_delimiter = ' '
        )]
        trusted_public_keys: Vec<String>,
        /// A cache that serves what this one's references lack (upload does not push
        /// what upstream has); repeatable. Without one, such references are listed as
        /// MISSING (upstream?), not as broken.
        #[arg(long = "upstream", env = "NARPIPE_UPSTREAMS", value_delimiter = ' ')]
        upstreams: Vec<String>,
        /// Narinfos checked at once.
        #[arg(short, long, default_value_t = 32)]
        jobs: usize,
    },
    /// Run COMMAND with Nix set to hand every path it builds to a private upload,
    /// then finish uploading and exit with COMMAND's status (1 if it succeeded but
    /// uploads failed). Paths Nix only fetched or already had are not pushed.
    Exec {
        #[command(flatten)]
        run: Box<RunArgs>,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy every narinfo and NAR of one cache into another (file, S3, GCS, Azure, HTTP), verifying
    /// hashes as it streams, keeping signatures and adding ours, skipping what the
    /// destination has, references first. Run it again to finish an interrupted import.
    Import {
        /// The cache to copy from.
        source_url: String,
        /// The cache to copy into.
        cache_url: String,
        /// A Nix secret key to add a signature with; repeatable.
        #[arg(long, env = "NARPIPE_SECRET_KEY_FILE", value_delimiter = ',')]
        secret_key_file: Vec<PathBuf>,
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// Entries copied at once.
        #[arg(short, long, default_value_t = 8)]
        jobs: usize,
    },
    /// Print the roots the state dir still owes the cache: pending ones and those that
    /// failed (retried at the next start), with attempts and the last error. Safe while
    /// an upload runs.
    Status {
        /// The state directory (default: $STATE_DIRECTORY, else /var/lib/narpipe).
        #[arg(long, env = "NARPIPE_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print a shell completion script for upload.
    Completions { shell: clap_complete::Shell },
    /// Print upload's man page (roff).
    Man,
}

/// What upstream serves is not pushed.
#[derive(clap::Args, Debug)]
struct UpstreamArgs {
    /// Don't push a path the store holds a signature for by this key name (the part
    /// before `:`), as Nix keeps for what it substituted; repeatable. Costs no request.
    #[arg(
        long = "upstream-key",
        env = "NARPIPE_UPSTREAM_KEYS",
        value_delimiter = ' ',
        default_value = narpipe::upstream::DEFAULT_KEY
    )]
    upstream_keys: Vec<String>,

    /// Don't push a path this cache has a narinfo for (any cache URL, e.g.
    /// https://cache.nixos.org); repeatable. One request per path, remembered.
    #[arg(long = "upstream", env = "NARPIPE_UPSTREAMS", value_delimiter = ' ')]
    upstreams: Vec<String>,

    /// Push everything: consult no upstream key or cache (mirrors, air-gapped caches).
    #[arg(long, env = "NARPIPE_NO_UPSTREAM")]
    no_upstream: bool,
}

/// The upstream filter the flags describe.
fn upstream(args: &UpstreamArgs) -> Result<narpipe::upstream::Upstream> {
    if args.no_upstream {
        return Ok(narpipe::upstream::Upstream::default());
    }
    Ok(narpipe::upstream::Upstream {
        keys: args
            .upstream_keys
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
        caches: args
            .upstreams
            .iter()
            .filter(|u| !u.is_empty())
            // Few retries and short timeouts: an upstream that does not answer is
            // not waited for (its paths are pushed instead).
            .map(|u| {
                Cache::open(u)
                    .and_then(|c| c.probe())
                    .with_context(|| format!("--upstream {u}"))
            })
            .collect::<Result<_>>()?,
    })
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The cache: file:///dir (or /dir), s3://bucket[/prefix][?…], gs://bucket[/prefix][?…],
    /// azure://container[/prefix][?…], http(s)://host[:port]/prefix (WebDAV PUT). Name
    /// several to push to all of them (each NAR is made once); in the environment,
    /// separated by spaces.
    #[arg(env = "NARPIPE_CACHE", value_delimiter = ' ')]
    cache_urls: Vec<String>,

    /// Where store paths come from, one per line: "-" for stdin, a file, or a FIFO.
    /// Under systemd socket activation (ListenFIFO=) the passed FIFO is used.
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

    /// Threads making NARs (default: number of CPUs); twice as many uploads are in flight.
    #[arg(short, long, env = "NARPIPE_JOBS")]
    jobs: Option<usize>,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// Priority written to a new nix-cache-info (lower is preferred by Nix).
    #[arg(long, env = "NARPIPE_PRIORITY", default_value_t = 40)]
    priority: u32,

    /// Write at most this many bytes per second, to all caches together: bytes, or
    /// with K, M or G (powers of 1024), e.g. 5M.
    #[arg(long, env = "NARPIPE_MAX_RATE", value_name = "BYTES_PER_SEC")]
    max_rate: Option<narpipe::rate::Rate>,

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

    /// Never push store paths whose name matches this regex (nor what refers to them);
    /// repeatable. In the environment: newline-separated.
    #[arg(
        long,
        env = "NARPIPE_EXCLUDE",
        value_delimiter = '\n',
        allow_hyphen_values = true
    )]
    exclude: Vec<String>,

    /// Push only store paths whose name matches one of these regexes; repeatable.
    #[arg(
        long,
        env = "NARPIPE_INCLUDE",
        value_delimiter = '\n',
        allow_hyphen_values = true
    )]
    include: Vec<String>,

    /// Also push the built outputs of each path's whole build closure (for a .drv, or a
    /// path whose deriver is known), so that a fresh machine needn't rebuild them.
    #[arg(long, env = "NARPIPE_INCLUDE_BUILD_DEPS")]
    include_build_deps: bool,

    /// Also write <hash>.ls, the JSON listing of each NAR's files, as Nix's
    /// write-nar-listing does.
    #[arg(long, env = "NARPIPE_WRITE_NAR_LISTING")]
    write_nar_listing: bool,

    /// Also upload the build log of each pushed path's deriver, when Nix kept one on
    /// this machine, as log/<name>.drv (what `nix store copy-log` writes).
    #[arg(long, env = "NARPIPE_UPLOAD_LOGS")]
    upload_logs: bool,

    /// Also write the realisation of each pushed output of a content-addressed
    /// derivation (realisations/<id>.doi, signed), as nix copy does with
    /// ca-derivations.
    #[arg(long, env = "NARPIPE_WRITE_REALISATIONS")]
    write_realisations: bool,

    /// Nix's log directory, where --upload-logs finds build logs.
    #[arg(long, env = "NIX_LOG_DIR", default_value = "/nix/var/log/nix")]
    nix_log_dir: PathBuf,

    #[command(flatten)]
    upstream: UpstreamArgs,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9145.
    #[arg(long, env = "NARPIPE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,

    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(long, env = "NARPIPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Check the configuration, keys and access to the cache, then exit.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// ---- logging ------------------------------------------------------------------------

static BAR: OnceLock<indicatif::ProgressBar> = OnceLock::new();

struct Logger {
    json: bool,
    colour: bool,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.json {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            serde_json::json!({
                "ts": ts,
                "level": r.level().as_str().to_lowercase(),
                "msg": r.args().to_string(),
            })
            .to_string()
        } else {
            let (prefix, colour) = match r.level() {
                log::Level::Error => ("error: ", "\x1b[31m"),
                log::Level::Warn => ("warning: ", "\x1b[33m"),
                _ => ("", ""),
            };
            if self.colour && !prefix.is_empty() {
                format!("{colour}{prefix}\x1b[0m{}", r.args())
            } else {
                format!("{prefix}{}", r.args())
            }
        };
        // A log nobody reads any more (a closed pipe) is not worth a panic.
        let write = || {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        };
        match BAR.get() {
            Some(bar) if !bar.is_finished() => bar.suspend(write),
            _ => write(),
        }
    }
    fn flush(&self) {}
}

// ---- configuration ------------------------------------------------------------------

const DEFAULT_STATE_DIR: &str = "/var/lib/narpipe";
/// Threads tokio may start for blocking work (local-file objects, fsync, stdin).
const BLOCKING_THREADS: usize = 8;

/// The state directory: the option, else systemd's $STATE_DIRECTORY (first entry),
/// else the default when `needed`.
fn state_dir(args: &RunArgs, needed: bool) -> Option<PathBuf> {
    args.state_dir
        .clone()
        .or_else(systemd_state_dir)
        .or_else(|| needed.then(|| PathBuf::from(DEFAULT_STATE_DIR)))
}

/// systemd's $STATE_DIRECTORY (its first entry).
fn systemd_state_dir() -> Option<PathBuf> {
    std::env::var("STATE_DIRECTORY").ok().and_then(|v| {
        v.split(':')
            .next()
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    })
}

/// A state dir must be a directory, or not exist yet: the journal's own error would be
/// "File exists" or "Not a directory", about a file inside it.
fn check_state_dir(dir: &std::path::Path) -> Result<()> {
    let not_a_dir = |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| !m.is_dir());
    if not_a_dir(dir) {
        anyhow::bail!("state dir {} is not a directory", dir.display());
    }
    if let Some(file) = dir.ancestors().skip(1).find(|a| not_a_dir(a)) {
        anyhow::bail!(
            "state dir {} cannot be created: {} is not a directory",
            dir.display(),
            file.display()
        );
    }
    Ok(())
}

fn regexes(list: &[String], flag: &str) -> Result<Vec<regex::Regex>> {
    list.iter()
        .filter(|r| !r.is_empty())
        .map(|r| regex::Regex::new(r).with_context(|| format!("{flag} {r:?}")))
        .collect()
}

fn read_keys(files: &[PathBuf]) -> Result<Vec<SecretKey>> {
    Ok(narpipe::key_file::read(files)?)
}

fn config(args: &RunArgs) -> Result<Config> {
    let urls: Vec<&String> = args.cache_urls.iter().filter(|u| !u.is_empty()).collect();
    anyhow::ensure!(
        !urls.is_empty(),
        "no cache URL given (argument CACHE_URL or NARPIPE_CACHE)"
    );
    let store_dir = StoreDir::new(&args.store_dir).context("--store-dir")?;
    // One cap for the whole run, shared by its caches.
    let rate = args
        .max_rate
        .map(|r| Arc::new(narpipe::rate::RateLimit::new(r)));
    let mut caches: Vec<Cache> = Vec::new();
    let mut stats = Vec::new();
    for url in urls {
        let cache = Cache::open(url)?.with_rate_limit(rate.clone());
        anyhow::ensure!(
            !caches.iter().any(|c| c.url() == cache.url()),
            "cache {} is named twice",
            cache.url()
        );
        let counts = Arc::new(Stats::default());
        cache.count_into(&counts);
        caches.push(cache);
        stats.push(counts);
    }
    let keys = read_keys(&args.secret_key_file)?;
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
        caches,
        store_dir,
        keys,
        compression: args.compression,
        level: args.compression_level,
        jobs,
        priority: args.priority,
        queue: None,
        pending: Vec::new(),
        spool_dir: None,
        max_attempts: args.max_attempts,
        filter: Filter {
            include: regexes(&args.include, "--include")?,
            exclude: regexes(&args.exclude, "--exclude")?,
        },
        stats,
        include_build_deps: args.include_build_deps,
        upstream: upstream(&args.upstream)?,
        write_nar_listing: args.write_nar_listing,
        upload_logs: args.upload_logs.then(|| args.nix_log_dir.clone()),
        write_realisations: args.write_realisations,
    })
}

/// systemd socket activation: the FIFO of a ListenFIFO= socket unit, passed as fd 3.
/// Reopened through /proc so that no unsafe fd handling is needed; the data in the
/// pipe is the same, and systemd keeps its end open across restarts.
fn activated_fifo() -> Option<String> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (pid == std::process::id() && fds >= 1).then(|| "/proc/self/fd/3".to_string())
}

async fn start(args: &RunArgs) -> Result<(Config, Input)> {
    let mut cfg = config(args)?;
    let input_path = match (args.input.as_str(), activated_fifo()) {
        ("-", Some(fd)) => fd,
        (given, _) => given.to_string(),
    };
    let input = Input::open(&input_path).await?;
    if let Some(dir) = state_dir(args, matches!(input, Input::Fifo(_))) {
        check_state_dir(&dir)?;
        let (queue, pending) = daemon::open_queue(&dir).await?;
        if !pending.is_empty() {
            log::info!("{} paths pending in {}", pending.len(), dir.display());
        }
        cfg.queue = Some(queue);
        cfg.pending = pending;
        cfg.spool_dir = Some(args.spool_dir.clone().unwrap_or_else(|| dir.join("spool")));
    }
    daemon::prepare(&cfg).await?;
    Ok((cfg, input))
}

// ---- signals, progress ----------------------------------------------------------------

fn notify(state: sd_notify::NotifyState) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[state]);
    }
}

/// Turns signals into the daemon's shutdown value. A second SIGINT/SIGTERM exits at once.
fn watch_signals(shutdown: Shutdown) -> Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            notify(sd_notify::NotifyState::Stopping);
            if sig == SIGHUP {
                log::info!("SIGHUP: finishing what was sent, then exiting");
                shutdown.drain.cancel();
            } else if shutdown.stop.is_cancelled() {
                std::process::exit(130);
            } else {
                log::info!("stopping; unfinished paths stay recorded for the next start");
                shutdown.drain.cancel();
                shutdown.stop.cancel();
            }
        }
    });
    Ok(())
}

fn progress_line(s: &Stats) -> String {
    let secs = s.started.elapsed().as_secs_f64().max(0.001);
    format!(
        "progress: {}/{} paths, {} of {} NAR, {}/s, {} in queue",
        s.finished.load(Relaxed),
        s.planned.load(Relaxed),
        human(s.finished_bytes.load(Relaxed)),
        human(s.planned_bytes.load(Relaxed)),
        human((s.finished_bytes.load(Relaxed) as f64 / secs) as u64),
        s.queue.load(Relaxed),
    )
}

/// A progress bar on a terminal (one-shot runs); elsewhere a summary line every few
/// seconds (one-shot) or every minute when something changed (daemon).
fn show_progress(caches: Vec<Arc<Stats>>, daemon_mode: bool) {
    if std::io::stderr().is_terminal() && !daemon_mode {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} paths  {msg}  [{elapsed_precise}, ETA {eta}]",
            )
            .expect("valid template"),
        );
        let _ = BAR.set(bar.clone());
        tokio::spawn(async move {
            loop {
                let stats = Stats::sum(&caches);
                bar.set_length(stats.planned.load(Relaxed));
                bar.set_position(stats.finished.load(Relaxed));
                let secs = stats.started.elapsed().as_secs_f64().max(0.001);
                bar.set_message(format!(
                    "{} / {}  {}/s",
                    human(stats.finished_bytes.load(Relaxed)),
                    human(stats.planned_bytes.load(Relaxed)),
                    human((stats.finished_bytes.load(Relaxed) as f64 / secs) as u64)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    } else {
        let every = if daemon_mode { 60 } else { 5 };
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                let line = progress_line(&Stats::sum(&caches));
                if line != last {
                    log::info!("{line}");
                    last = line;
                }
            }
        });
    }
}

// ---- commands -----------------------------------------------------------------------

/// Writes a command's output to stdout. A reader that has gone away (`upload man |
/// head`) ends it quietly with success, as for any Unix filter; another write error is
/// reported (exit 2).
fn print_stdout(text: &[u8]) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("cannot write to stdout: {e}");
            ExitCode::from(2)
        }
    }
}

async fn upload(args: RunArgs) -> ExitCode {
    let (cfg, input) = match start(&args).await {
        Ok(v) => v,
        Err(e) => {
            log::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        if let Some(down) = cfg.caches.iter().find(|c| !c.is_prepared()) {
            log::error!("{} cannot be reached", down.url());
            return ExitCode::from(2);
        }
        log::info!(
            "configuration ok: {} {} readable and writable; {} signing keys{}",
            cfg.caches
                .iter()
                .map(|c| c.url())
                .collect::<Vec<_>>()
                .join(", "),
            if cfg.caches.len() == 1 { "is" } else { "are" },
            cfg.keys.len(),
            if cfg.keys.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    cfg.keys
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        return ExitCode::SUCCESS;
    }
    let shutdown = Shutdown::default();
    if let Err(e) = watch_signals(shutdown.clone()) {
        log::error!("{e:#}");
        return ExitCode::from(2);
    }
    if let Some(addr) = args.metrics_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                log::info!("metrics at http://{addr}/metrics");
                let per_cache = cfg
                    .caches
                    .iter()
                    .map(|c| c.url().to_string())
                    .zip(cfg.stats.iter().cloned())
                    .collect();
                tokio::spawn(narpipe::metrics::serve(l, per_cache));
            }
            Err(e) => {
                log::error!("--metrics-listen {addr}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let daemon_mode = matches!(input, Input::Fifo(_));
    show_progress(cfg.stats.clone(), daemon_mode);
    notify(sd_notify::NotifyState::Ready);
    let summary = daemon::run(cfg, input, shutdown).await;
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
    log::info!("summary: {summary}");
    if summary.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn verify(url: &str, keys: &[String], upstreams: Vec<String>, jobs: usize) -> ExitCode {
    let setup = || -> Result<(Cache, Vec<PublicKey>, narpipe::upstream::Upstream)> {
        let cache = Cache::open(url)?;
        let keys = keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.parse()
                    .with_context(|| format!("--trusted-public-key {k:?}"))
            })
            .collect::<Result<Vec<PublicKey>>>()?;
        let upstream = upstream(&UpstreamArgs {
            upstream_keys: Vec::new(),
            upstreams,
            no_upstream: false,
        })?;
        Ok((cache, keys, upstream))
    };
    let (cache, keys, upstream) = match setup() {
        Ok(v) => v,
        Err(e) => {
            log::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    match narpipe::verify::verify(&cache, &keys, &upstream, jobs).await {
        Ok(report) => {
            // The exit status says whether the cache is broken, whatever became of these.
            print_stdout(report.lines().as_bytes());
            log::info!(
                "{}",
                report.summary(cache.url(), !upstream.caches.is_empty(), !keys.is_empty())
            );
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(2)
        }
    }
}

/// `upload exec`: a private FIFO and post-build-hook for one command.
async fn exec(args: RunArgs, command: Vec<String>) -> ExitCode {
    let mut cfg = match config(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            log::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = state_dir(&args, false) {
        if let Err(e) = check_state_dir(&dir) {
            log::error!("{e:#}");
            return ExitCode::from(2);
        }
        match daemon::open_queue(&dir).await {
            Ok((queue, pending)) => {
                cfg.queue = Some(queue);
                cfg.pending = pending;
            }
            Err(e) => {
                log::error!("{e}");
                return ExitCode::from(2);
            }
        }
    }
    let shutdown = Shutdown::default();
    if let Err(e) = watch_signals(shutdown.clone()) {
        log::error!("{e:#}");
        return ExitCode::from(2);
    }
    // The send beside this binary, else the one on $PATH.
    let send = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("send")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("send"));
    match narpipe::exec::run(cfg, &send, &command, shutdown).await {
        Ok(finished) => {
            if let Err(e) = &finished.command {
                log::error!("cannot run {:?}: {e}", command[0]);
            }
            log::info!("summary: {}", finished.summary);
            ExitCode::from(finished.exit_code())
        }
        Err(e) => {
            log::error!("{:#}", anyhow::Error::from(e));
            ExitCode::from(2)
        }
    }
}

/// `upload status`: what the queue in the state dir holds.
fn status(state_dir: Option<PathBuf>) -> ExitCode {
    let dir = state_dir
        .or_else(systemd_state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    match narpipe::queue::Status::read(&dir) {
        Ok(status) => print_stdout(status.render(std::time::SystemTime::now()).as_bytes()),
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(2)
        }
    }
}

async fn import(
    source: &str,
    dest: &str,
    key_files: &[PathBuf],
    upstream_args: &UpstreamArgs,
    jobs: usize,
) -> ExitCode {
    let setup = async {
        let keys = read_keys(key_files)?;
        let upstream = upstream(upstream_args)?;
        let (source, dest) = narpipe::import::open(source, dest).await?;
        for url in upstream.check().await? {
            log::warn!("upstream {url} has no nix-cache-info: is it a binary cache?");
        }
        Ok::<_, anyhow::Error>((source, dest, keys, upstream))
    };
    let (source, dest, keys, upstream) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            log::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    match narpipe::import::import(&source, &dest, &keys, &upstream, jobs).await {
        Ok(r) => {
            log::info!(
                "summary: {} narinfos in {}, {} already in {}, {} served upstream, {} imported, {} failed",
                r.in_source,
                source.url(),
                r.already_there,
                dest.url(),
                r.upstream,
                r.imported,
                r.failed
            );
            if r.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Some(Command::Exec { run, .. }) => run.log_format,
        _ => cli.run.log_format,
    };
    let logger = Logger {
        json: log_format == LogFormat::Json,
        colour: std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let _ = log::set_boxed_logger(Box::new(logger))
        .map(|()| log::set_max_level(log::LevelFilter::Info));
    match &cli.command {
        // Made in memory: clap_complete panics on a write error (`| head`).
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "upload", &mut script);
            return print_stdout(&script);
        }
        Some(Command::Man) => {
            let mut page = Vec::new();
            return match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => print_stdout(&page),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    // The runtime only waits on IO (NARs are made on the engine's own threads): a few
    // workers, and a capped blocking pool for local-file object operations and fsyncs,
    // so the thread count stays fixed whatever the number of paths.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.min(4))
        .max_blocking_threads(BLOCKING_THREADS)
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
        match cli.command {
            Some(Command::Verify {
                cache_url,
                trusted_public_keys,
                upstreams,
                jobs,
            }) => verify(&cache_url, &trusted_public_keys, upstreams, jobs).await,
            Some(Command::Exec { run, command }) => exec(*run, command).await,
            Some(Command::Status { state_dir }) => status(state_dir),
            Some(Command::Import {
                source_url,
                cache_url,
                secret_key_file,
                upstream,
                jobs,
            }) => import(&source_url, &cache_url, &secret_key_file, &upstream, jobs).await,
            _ => upload(cli.run).await,
        }
    });
    // A local-file write still on a blocking thread: don't wait for it long.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
