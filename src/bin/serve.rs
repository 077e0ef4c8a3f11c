//! `serve`: a binary cache over HTTP, from a cache or from this machine's Nix store.
//!
//! ```text
//! serve file:///srv/cache                    # a folder upload wrote
//! serve 's3://my-cache?region=eu-west-1'     # a bucket, with the server's credentials
//! serve --secret-key-file /etc/nix/cache.sk local   # the local Nix store, signed
//! ```
//! Exit codes: 0 stopped by SIGINT/SIGTERM; 1 the server failed while running; 2 usage
//! or configuration error (bad URL or key, address in use, cache unreachable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use narpipe::cache::Cache;
use narpipe::cache_info::CacheInfo;
use narpipe::serve::{self, bucket::Bucket, http::Server, local, proxy, Counters, Source};
use narpipe::store_path::StoreDir;
use tokio_util::sync::CancellationToken;

/// Serve a Nix binary cache over HTTP, read-only: a cache narpipe (or Nix) wrote, in a
/// folder or a bucket, or this machine's Nix store.
///
/// Clients need no cloud credentials: only this server holds them. Only the names of
/// a binary cache are answered (nix-cache-info, *.narinfo, nar/*, *.ls, log/*,
/// realisations/*); anything else is 404.
#[derive(Parser, Debug)]
#[command(version, name = "serve")]
struct Cli {
    /// What to serve: `local` for this machine's Nix store (NARs made on the fly,
    /// narinfos signed with --secret-key-file), or a cache: file:///dir (or /dir),
    /// s3://bucket[/prefix][?…], gs://bucket[/prefix][?…], azure://container[/prefix][?…],
    /// http(s)://host[:port]/prefix.
    #[arg(env = "NARPIPE_SERVE_SOURCE")]
    source: String,

    /// Address to listen on: HOST:PORT, or a port alone for 127.0.0.1:PORT.
    #[arg(
        short,
        long,
        env = "NARPIPE_SERVE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: String,

    /// For `local`: a Nix secret key to sign narinfos with; repeatable (in the
    /// environment: comma-separated). A cache's narinfos are served as stored.
    #[arg(long, env = "NARPIPE_SERVE_SECRET_KEY_FILE", value_delimiter = ',')]
    secret_key_file: Vec<PathBuf>,

    /// The Nix store directory.
    #[arg(long, env = "NIX_STORE_DIR", default_value = "/nix/store")]
    store_dir: String,

    /// For `local`: Nix's state directory (its database is db/db.sqlite there).
    #[arg(long, env = "NIX_STATE_DIR", default_value = "/nix/var/nix")]
    nix_state_dir: PathBuf,

    /// For `local`: where Nix keeps build logs (served as log/<drv>).
    #[arg(long, env = "NIX_LOG_DIR", default_value = "/nix/var/log/nix")]
    nix_log_dir: PathBuf,

    /// For `local`: the Priority its nix-cache-info gives (lower is preferred by Nix).
    #[arg(long, env = "NARPIPE_PRIORITY", default_value_t = 40)]
    priority: u32,

    /// For `local`: threads making NARs (default: number of CPUs).
    #[arg(short, long, env = "NARPIPE_SERVE_JOBS")]
    jobs: Option<usize>,

    /// For a cache: keep what it answers in this directory (created if missing), so that
    /// what one client fetched is served to the next without asking the backend.
    #[arg(long, env = "NARPIPE_SERVE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// The most the cache dir holds: bytes, or with K, M, G, T (powers of 1024); the
    /// least recently used objects go first.
    #[arg(long, env = "NARPIPE_SERVE_CACHE_SIZE", default_value = "10G", value_parser = size)]
    cache_size: u64,

    /// Seconds a narinfo (and every object but NARs, which never change) is reused from
    /// the cache dir before the backend is asked again.
    #[arg(long, env = "NARPIPE_SERVE_CACHE_TTL", default_value_t = 3600)]
    cache_ttl: u64,

    /// Seconds a 404 from the backend is remembered (with --cache-dir).
    #[arg(long, env = "NARPIPE_SERVE_NEGATIVE_TTL", default_value_t = 60)]
    negative_ttl: u64,

    /// Don't show the explorer (HTML pages listing the cache's paths) at `/`.
    #[arg(long, env = "NARPIPE_SERVE_NO_EXPLORER")]
    no_explorer: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "NARPIPE_SERVE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

/// `10G`, `512M`, `1048576`.
fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (number, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size: give bytes, or e.g. 512M or 10G"))
}

/// Prints `warning: …`/`error: …` lines on stderr, info plainly.
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
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{prefix}{}", r.args());
    }
    fn flush(&self) {}
}

fn listen_addr(s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .with_context(|| format!("--listen {s:?}: want HOST:PORT (e.g. 127.0.0.1:8080) or a port"))
}

/// What the arguments name, checked; contacts the cache (few retries).
async fn source(cli: &Cli, store_dir: &StoreDir, counters: &Arc<Counters>) -> Result<Source> {
    if cli.source == "local" {
        if cli.cache_dir.is_some() {
            bail!("--cache-dir keeps a cache's answers; the local store needs none");
        }
        let keys = narpipe::key_file::read(&cli.secret_key_file)?;
        if keys.is_empty() {
            log::warn!(
                "no --secret-key-file: narinfos carry only the store's own signatures, which \
                 clients reject unless they trust those keys"
            );
        }
        let jobs = cli
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let store = local::LocalStore::open(local::Config {
            store_dir: store_dir.clone(),
            state_dir: cli.nix_state_dir.clone(),
            log_dir: cli.nix_log_dir.clone(),
            keys,
            priority: cli.priority,
            jobs,
        })?;
        return Ok(Source::Local(store));
    }
    if !cli.secret_key_file.is_empty() {
        bail!(
            "--secret-key-file signs the local store's narinfos; a cache's are served as \
             stored (signed by whoever wrote them)"
        );
    }
    let cache = Cache::open(&cli.source)?;
    if let narpipe::cache_url::CacheUrl::File { dir } = cli.source.parse()? {
        if std::path::Path::new(&dir) == std::path::Path::new(store_dir.as_str()) {
            bail!("{dir} is the Nix store itself, not a binary cache: serve it with `serve local`");
        }
        if !std::path::Path::new(&dir).is_dir() {
            bail!("cache folder {dir} does not exist");
        }
    }
    // Reachable, credentials accepted, made for this store: said now, not per request.
    let probe = cache.probe()?;
    match probe.get("nix-cache-info").await {
        Ok(Some(text)) => {
            let info = CacheInfo::parse(&String::from_utf8_lossy(&text));
            if let Some(theirs) = info.store_dir.filter(|d| d != store_dir.as_str()) {
                log::warn!(
                    "{} is a cache for the store {theirs}, not {}",
                    cache.url(),
                    store_dir.as_str()
                );
            }
        }
        Ok(None) => log::warn!(
            "{} has no nix-cache-info: Nix will not use it as a substituter",
            cache.url()
        ),
        Err(e) => match e.diagnosis() {
            Some(d) => bail!("{d}: {e}"),
            None => return Err(e.into()),
        },
    }
    if cli.cache_dir.is_some() && cache.local_dir().is_some() {
        bail!("--cache-dir is for remote caches: a folder is read directly");
    }
    let bucket = Bucket::new(cache);
    Ok(match &cli.cache_dir {
        None => Source::Bucket(bucket),
        Some(dir) => Source::Cached(proxy::Proxy::open(
            bucket,
            proxy::Config {
                dir: dir.clone(),
                max_bytes: cli.cache_size,
                ttl: Duration::from_secs(cli.cache_ttl),
                negative_ttl: Duration::from_secs(cli.negative_ttl),
            },
            counters.clone(),
        )?),
    })
}

fn notify(state: sd_notify::NotifyState) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[state]);
    }
}

async fn try_main(cli: Cli) -> Result<ExitCode> {
    let store_dir = StoreDir::new(&cli.store_dir).context("--store-dir")?;
    let addr = listen_addr(&cli.listen)?;
    let counters = Arc::new(Counters::default());
    let source = source(&cli, &store_dir, &counters).await?;
    if let Some(addr) = cli.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen {addr}"))?;
        log::info!(
            "metrics at http://{}/metrics",
            l.local_addr().unwrap_or(addr)
        );
        let c = counters.clone();
        tokio::spawn(narpipe::metrics::serve_text(
            l,
            Arc::new(move || c.render()),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    log::info!("serving {} on http://{bound}", source.describe());
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install signal handlers")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            notify(sd_notify::NotifyState::Stopping);
            log::info!("stopping: no new connections, answers under way may finish");
            shutdown.cancel();
        });
    }
    notify(sd_notify::NotifyState::Ready);
    serve::http::run(
        listener,
        Arc::new(Server {
            source,
            counters,
            explorer: !cli.no_explorer,
            catalogue: Default::default(),
        }),
        shutdown,
    )
    .await;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = log::set_boxed_logger(Box::new(Logger))
        .map(|()| log::set_max_level(log::LevelFilter::Info));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4),
        )
        .max_blocking_threads(16)
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
        match try_main(cli).await {
            Ok(code) => code,
            Err(e) => {
                log::error!("{e:#}");
                ExitCode::from(2)
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
