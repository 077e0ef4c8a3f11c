//! Cache URLs, parsed and checked before anything is contacted.
//!
//! ```text
//! file:///srv/cache            /srv/cache
//! s3://BUCKET[/PREFIX]?region=eu-west-1&endpoint=http://127.0.0.1:8333&profile=ci&scheme=https
//! gs://BUCKET[/PREFIX]?service-account=/etc/narpipe/gcs.json&endpoint=http://127.0.0.1:4443&anonymous=true
//! azure://CONTAINER[/PREFIX]?account=mystorage&endpoint=http://127.0.0.1:10000/devstoreaccount1
//! http(s)://HOST[:PORT][/PREFIX]  a WebDAV server (PUT, DELETE, MOVE); or read only,
//!                                  as an --upstream such as https://cache.nixos.org
//! ```
//! S3 parameters use Nix's own names (`region`, `endpoint`, `profile`, `scheme`); an
//! endpoint without a scheme gets `scheme` (default https), as in Nix. Azure's `account`
//! is the storage account (else `AZURE_STORAGE_ACCOUNT_NAME`); its `endpoint` is the
//! blob service's URL, account path included for an emulator. A parameter that
//! is not understood is an error naming it, never silently ignored. Credentials never
//! go in a URL (it shows in `ps` and logs): HTTP ones come from a file (see
//! [`crate::http_auth`]), the others from the environment. Pure: no IO.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cache URL {url:?}: {reason}")]
pub struct Error {
    pub url: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUrl {
    File {
        dir: String,
    },
    S3 {
        bucket: String,
        prefix: Option<String>,
        region: Option<String>,
        /// Full URL, scheme included.
        endpoint: Option<String>,
        profile: Option<String>,
    },
    Gcs {
        bucket: String,
        prefix: Option<String>,
        service_account: Option<String>,
        endpoint: Option<String>,
        /// Send no credentials (emulators, public test buckets).
        anonymous: bool,
    },
    Azure {
        container: String,
        prefix: Option<String>,
        /// The storage account; else object_store reads `AZURE_STORAGE_ACCOUNT_NAME`.
        account: Option<String>,
        /// Full URL of the blob service (default `https://ACCOUNT.blob.core.windows.net`).
        endpoint: Option<String>,
    },
    /// A cache served over HTTP(S): a WebDAV server narpipe writes to, or one only read,
    /// such as cache.nixos.org.
    Http {
        /// The whole URL, without a trailing slash.
        url: String,
    },
}

const S3_PARAMS: &[&str] = &["region", "endpoint", "profile", "scheme"];
const GS_PARAMS: &[&str] = &["service-account", "endpoint", "anonymous"];
const AZURE_PARAMS: &[&str] = &["account", "endpoint"];

impl FromStr for CacheUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self, Error> {
        let err = |reason: String| Error {
            url: url.to_string(),
            reason,
        };
        if url.starts_with('/') {
            return Ok(CacheUrl::File {
                dir: url.trim_end_matches('/').to_string(),
            }
            .normalised());
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            err(
                "want file:///dir, s3://bucket, gs://bucket, azure://container, http(s)://host \
                 or an absolute path"
                    .into(),
            )
        })?;
        if scheme == "file" {
            if rest.contains('?') {
                return Err(err("file:// caches take no parameters".into()));
            }
            if !rest.starts_with('/') {
                return Err(err(
                    "the folder must be an absolute path (file:///dir)".into()
                ));
            }
            return Ok(CacheUrl::File {
                dir: rest.trim_end_matches('/').to_string(),
            }
            .normalised());
        }
        if scheme == "http" || scheme == "https" {
            let parsed = url::Url::parse(url).map_err(|e| err(e.to_string()))?;
            if parsed.query().is_some() {
                return Err(err("http(s):// caches take no parameters".into()));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(err("no host".into()));
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                // Said without echoing them.
                let mut shown = parsed.clone();
                let _ = shown.set_username("");
                let _ = shown.set_password(None);
                return Err(Error {
                    url: shown.to_string(),
                    reason: "credentials in the URL would show in ps and logs: put them in \
                             $NARPIPE_HTTP_AUTH_FILE (netrc format)"
                        .into(),
                });
            }
            return Ok(CacheUrl::Http {
                url: url.trim_end_matches('/').to_string(),
            });
        }
        let known = match scheme {
            "s3" => S3_PARAMS,
            "gs" => GS_PARAMS,
            "azure" => AZURE_PARAMS,
            other => {
                return Err(err(format!(
                    "unsupported scheme {other}:// (want file://, s3://, gs://, azure:// or \
                     http(s)://)"
                )))
            }
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(err(if scheme == "azure" {
                "no container name".into()
            } else {
                "no bucket name".into()
            }));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = (!prefix.is_empty()).then(|| prefix.to_string());
        let mut params: Vec<(String, String)> = Vec::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if !known.contains(&k.as_ref()) {
                return Err(err(format!(
                    "unknown parameter {k:?} for {scheme}:// (known: {})",
                    known.join(", ")
                )));
            }
            if params.iter().any(|(seen, _)| *seen == k) {
                return Err(err(format!("parameter {k:?} given twice")));
            }
            if v.is_empty() {
                return Err(err(format!("parameter {k:?} has no value")));
            }
            params.push((k.into_owned(), v.into_owned()));
        }
        let take = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let endpoint = |scheme_param: Option<String>| -> Result<Option<String>, Error> {
            let Some(ep) = take("endpoint") else {
                return Ok(None);
            };
            let full = if ep.contains("://") {
                ep
            } else {
                format!("{}://{ep}", scheme_param.as_deref().unwrap_or("https"))
            };
            let parsed =
                url::Url::parse(&full).map_err(|e| err(format!("endpoint {full:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(err(format!("endpoint {full:?}: want http or https")));
            }
            Ok(Some(full.trim_end_matches('/').to_string()))
        };
        match scheme {
            "s3" => {
                let scheme_param = take("scheme");
                if let Some(s) = &scheme_param {
                    if s != "http" && s != "https" {
                        return Err(err(format!("scheme {s:?}: want http or https")));
                    }
                }
                Ok(CacheUrl::S3 {
                    bucket: bucket.to_string(),
                    prefix,
                    region: take("region"),
                    endpoint: endpoint(scheme_param)?,
                    profile: take("profile"),
                })
            }
            "azure" => Ok(CacheUrl::Azure {
                container: bucket.to_string(),
                prefix,
                account: take("account"),
                endpoint: endpoint(None)?,
            }),
            _ => {
                let anonymous = match take("anonymous").as_deref() {
                    None | Some("false") | Some("0") => false,
                    Some("true") | Some("1") => true,
                    Some(other) => {
                        return Err(err(format!("anonymous={other}: want true or false")))
                    }
                };
                Ok(CacheUrl::Gcs {
                    bucket: bucket.to_string(),
                    prefix,
                    service_account: take("service-account"),
                    endpoint: endpoint(None)?,
                    anonymous,
                })
            }
        }
    }
}

impl CacheUrl {
    fn normalised(self) -> Self {
        match self {
            CacheUrl::File { dir } if dir.is_empty() => CacheUrl::File { dir: "/".into() },
            other => other,
        }
    }
}

/// The URL without credentials-bearing parameters, for logs.
impl fmt::Display for CacheUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loc =
            |f: &mut fmt::Formatter<'_>, scheme: &str, bucket: &str, prefix: &Option<String>| {
                write!(f, "{scheme}://{bucket}")?;
                if let Some(p) = prefix {
                    write!(f, "/{p}")?;
                }
                Ok(())
            };
        match self {
            CacheUrl::File { dir } => write!(f, "file://{dir}"),
            CacheUrl::S3 {
                bucket,
                prefix,
                endpoint,
                ..
            } => {
                loc(f, "s3", bucket, prefix)?;
                if let Some(e) = endpoint {
                    write!(f, " at {e}")?;
                }
                Ok(())
            }
            CacheUrl::Gcs {
                bucket,
                prefix,
                endpoint,
                ..
            } => {
                loc(f, "gs", bucket, prefix)?;
                if let Some(e) = endpoint {
                    write!(f, " at {e}")?;
                }
                Ok(())
            }
            CacheUrl::Azure {
                container,
                prefix,
                account,
                endpoint,
            } => {
                loc(f, "azure", container, prefix)?;
                if let Some(a) = account {
                    write!(f, " in account {a}")?;
                }
                if let Some(e) = endpoint {
                    write!(f, " at {e}")?;
                }
                Ok(())
            }
            CacheUrl::Http { url } => write!(f, "{url}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_caches() {
        let u: CacheUrl = "https://cache.nixos.org/".parse().unwrap();
        assert_eq!(
            u,
            CacheUrl::Http {
                url: "https://cache.nixos.org".into()
            }
        );
        assert_eq!(u.to_string(), "https://cache.nixos.org");
        assert_eq!(
            "http://127.0.0.1:8080/sub/dir/".parse::<CacheUrl>(),
            Ok(CacheUrl::Http {
                url: "http://127.0.0.1:8080/sub/dir".into()
            })
        );
        assert!("https://h/?priority=1".parse::<CacheUrl>().is_err());
    }

    #[test]
    fn credentials_in_an_http_url_are_refused_without_echoing_them() {
        for url in [
            "https://ci:hunter2@cache.example.org/c",
            "https://ci:hun@ter2@cache.example.org/c",
            "http://ci@cache.example.org",
        ] {
            let e = url.parse::<CacheUrl>().unwrap_err();
            assert!(e.reason.contains("NARPIPE_HTTP_AUTH_FILE"), "{e}");
            assert!(!e.to_string().contains("ter2"), "{e}");
            assert!(e.to_string().contains("cache.example.org"), "{e}");
        }
    }

    fn parse(s: &str) -> CacheUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn reason(s: &str) -> String {
        s.parse::<CacheUrl>().unwrap_err().reason
    }

    #[test]
    fn files() {
        assert_eq!(
            parse("/srv/cache/"),
            CacheUrl::File {
                dir: "/srv/cache".into()
            }
        );
        assert_eq!(
            parse("file:///srv/cache"),
            CacheUrl::File {
                dir: "/srv/cache".into()
            }
        );
        assert!(reason("file://relative").contains("absolute"));
        assert!(reason("file:///x?compression=zstd").contains("no parameters"));
        assert!(reason("relative/dir").contains("want file://"));
        assert!(reason("ftp://x/y").contains("unsupported scheme ftp://"));
    }

    #[test]
    fn s3_with_nix_parameter_names() {
        assert_eq!(
            parse("s3://bucket/some/prefix/?region=eu-west-1&endpoint=minio.local:9000&scheme=http&profile=ci"),
            CacheUrl::S3 {
                bucket: "bucket".into(),
                prefix: Some("some/prefix".into()),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://minio.local:9000".into()),
                profile: Some("ci".into()),
            }
        );
        assert_eq!(
            parse("s3://b?endpoint=https://r2.example.com/"),
            CacheUrl::S3 {
                bucket: "b".into(),
                prefix: None,
                region: None,
                endpoint: Some("https://r2.example.com".into()),
                profile: None,
            }
        );
    }

    #[test]
    fn unknown_or_bad_parameters_are_named() {
        // nixcached's README example: parameters another tool understands.
        let r = reason(
            "s3://mybucket?endpoint=minio.example.com:8080&disableSSL=true&s3ForcePathStyle=true",
        );
        assert!(r.contains("\"disableSSL\""), "{r}");
        assert!(reason("s3://b?compression=zstd").contains("\"compression\""));
        assert!(reason("s3://b?region=a&region=b").contains("twice"));
        assert!(reason("s3://b?region=").contains("no value"));
        assert!(reason("s3://b?scheme=ftp").contains("ftp"));
        assert!(reason("s3://b?endpoint=ftp://x").contains("http"));
        assert!(reason("s3://").contains("no bucket"));
        assert!(reason("gs://b?region=x").contains("\"region\""));
        assert!(reason("gs://b?anonymous=maybe").contains("maybe"));
    }

    #[test]
    fn gcs() {
        assert_eq!(
            parse("gs://bkt/pre?service-account=/etc/sa.json&endpoint=http://127.0.0.1:4443&anonymous=true"),
            CacheUrl::Gcs {
                bucket: "bkt".into(),
                prefix: Some("pre".into()),
                service_account: Some("/etc/sa.json".into()),
                endpoint: Some("http://127.0.0.1:4443".into()),
                anonymous: true,
            }
        );
        assert_eq!(parse("gs://bkt/pre").to_string(), "gs://bkt/pre");
    }

    #[test]
    fn azure() {
        assert_eq!(
            parse("azure://nix/some/prefix/?account=devstoreaccount1&endpoint=http://127.0.0.1:10000/devstoreaccount1/"),
            CacheUrl::Azure {
                container: "nix".into(),
                prefix: Some("some/prefix".into()),
                account: Some("devstoreaccount1".into()),
                endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            }
        );
        assert_eq!(
            parse("azure://nix?endpoint=acct.blob.core.windows.net"),
            CacheUrl::Azure {
                container: "nix".into(),
                prefix: None,
                account: None,
                endpoint: Some("https://acct.blob.core.windows.net".into()),
            }
        );
        assert_eq!(
            parse("azure://nix/p?account=a&endpoint=http://127.0.0.1:1/a").to_string(),
            "azure://nix/p in account a at http://127.0.0.1:1/a"
        );
        assert!(reason("azure://c?access_key=x").contains("\"access_key\""));
        assert!(reason("azure://c?region=x").contains("known: account, endpoint"));
        assert!(reason("azure://").contains("no container"));
        assert!(reason("azure://c?endpoint=ftp://x").contains("http"));
    }
}
