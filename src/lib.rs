//! narpipe: push Nix build results into binary caches.
//!
//! Modules, from the bottom up (each layer uses only the ones below it):
//! - formats (pure, no IO): [`nixbase32`], [`hash`], [`store_path`], [`narinfo`],
//!   [`cache_info`], [`signing`], [`nar`] (the NAR writer), [`nar_listing`] (`.ls`
//!   files), [`realisation`] (`.doi` files), [`pipe`] (line framing), [`http_auth`]
//!   (credentials for HTTP caches), [`parts`] (multipart part sizes); [`key_file`] reads
//!   secret keys for the binaries
//! - formats for compressed NARs: [`xz`] (one stream of independently compressed blocks),
//!   [`zstd_frame`] (whole zstd frames; narpipe's only `unsafe` code)
//! - adapters: [`compress`]; [`engine`] (makes compressed NARs on a pool of plain threads)
//! - IO edges, independent of each other: [`resolve`] (input → store path), [`nix`]
//!   (runs the Nix CLI; [`build_log`] reads its log directory), [`cache`] (the binary
//!   cache through `object_store`; [`webdav`] adapts its HTTP store to a writable
//!   cache; its HTTP clients ease off when the server pushes back, [`pushback`];
//!   [`rate`] caps the bytes written), [`queue`] (the durable queue on SQLite; it
//!   imports an earlier version's journal once), [`spool`], [`upstream`] (what upstream
//!   already serves)
//! - orchestration: [`daemon`] (the whole uploader, one module per stage; one path's life
//!   in `daemon::path`), [`exec`] (`upload exec`), [`import`], [`verify`]; [`serve`] (a
//!   binary cache over HTTP, from a cache or the local store)
//!
//! The binaries `upload`, `send` and `serve` are thin: arguments, logging, signals, exit
//! codes.

pub mod build_log;
pub mod cache;
pub mod cache_info;
pub mod cache_url;
pub mod compress;
pub mod daemon;
pub mod engine;
pub mod exec;
pub mod filter;
pub mod hash;
pub mod http_auth;
pub mod import;
pub mod key_file;
pub mod metrics;
pub mod nar;
pub mod nar_listing;
pub mod narinfo;
pub mod nix;
pub mod nixbase32;
pub mod parts;
pub mod pipe;
pub mod pushback;
pub mod queue;
pub mod rate;
pub mod realisation;
pub mod resolve;
pub mod serve;
pub mod signing;
pub mod spool;
pub mod stats;
pub mod store_path;
pub mod upstream;
pub mod verify;
pub mod webdav;
pub mod xz;
pub mod zstd_frame;
