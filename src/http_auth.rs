//! Credentials for HTTP(S) caches, in netrc's format, by host.
//!
//! ```text
//! # $NARPIPE_HTTP_AUTH_FILE (or the same text in $NARPIPE_HTTP_AUTH)
//! machine cache.example.org login ci password s3cret   # Authorization: Basic …
//! machine 10.0.0.5:8080 token eyJhbGciOi…               # Authorization: Bearer …
//! default login ci password other                       # any other host
//! ```
//! `login`/`password` entries are plain netrc, so the file Nix reads as `netrc-file` for
//! the same cache works here too; `token` is narpipe's addition for bearer tokens. An
//! entry for `host:port` wins over one for `host`, which wins over `default`. A
//! credential is only ever sent to the host it is written for. `account` is ignored;
//! `macdef` (netrc macros) is refused. Values may be double-quoted (`"a b"`, with `\"`
//! and `\\`). Pure: the caller reads the file and the environment.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("`{0}` before any machine or default entry")]
    Outside(String),
    #[error("`{0}` has no value")]
    NoValue(String),
    #[error("unknown keyword {0:?} (want machine, default, login, password or token)")]
    Unknown(String),
    #[error("netrc macros (macdef) are not supported")]
    Macro,
    #[error("an unterminated quote")]
    Quote,
    #[error("entry {0}: {1}")]
    Entry(String, &'static str),
}

/// What to send in `Authorization`.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic { login: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { login, .. } => write!(f, "Basic({login}, …)"),
            Credential::Bearer(_) => write!(f, "Bearer(…)"),
        }
    }
}

impl Credential {
    /// The `Authorization` header's value.
    pub fn header(&self) -> String {
        match self {
            Credential::Basic { login, password } => {
                format!("Basic {}", B64.encode(format!("{login}:{password}")))
            }
            Credential::Bearer(token) => format!("Bearer {token}"),
        }
    }
}

/// A parsed credentials file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AuthFile {
    /// (machine, credential); `None` for the `default` entry.
    entries: Vec<(Option<String>, Credential)>,
}

#[derive(Default)]
struct Partial {
    login: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

impl AuthFile {
    pub fn parse(text: &str) -> Result<AuthFile, Error> {
        let words = words(text)?;
        let mut entries = Vec::new();
        let mut current: Option<(Option<String>, Partial)> = None;
        let finish = |entry: Option<(Option<String>, Partial)>,
                      entries: &mut Vec<(Option<String>, Credential)>|
         -> Result<(), Error> {
            let Some((machine, p)) = entry else {
                return Ok(());
            };
            let name = machine.clone().unwrap_or_else(|| "default".to_string());
            let bad = |why| Err(Error::Entry(name.clone(), why));
            let cred = match (p.login, p.password, p.token) {
                (_, Some(_), Some(_)) => return bad("has both a password and a token"),
                (Some(login), Some(password), None) => Credential::Basic { login, password },
                (None, None, Some(token)) => Credential::Bearer(token),
                (Some(_), None, Some(_)) => return bad("has both a login and a token"),
                (Some(_), None, None) => return bad("has a login but no password"),
                (None, Some(_), None) => return bad("has a password but no login"),
                (None, None, None) => return bad("has no login/password or token"),
            };
            entries.push((machine, cred));
            Ok(())
        };
        let mut it = words.into_iter();
        while let Some(keyword) = it.next() {
            let mut value = || it.next().ok_or_else(|| Error::NoValue(keyword.clone()));
            match keyword.as_str() {
                "machine" => {
                    let host = value()?;
                    finish(current.take(), &mut entries)?;
                    current = Some((Some(host.to_ascii_lowercase()), Partial::default()));
                }
                "default" => {
                    finish(current.take(), &mut entries)?;
                    current = Some((None, Partial::default()));
                }
                "login" | "password" | "token" | "account" => {
                    let v = value()?;
                    let Some((_, p)) = current.as_mut() else {
                        return Err(Error::Outside(keyword.clone()));
                    };
                    match keyword.as_str() {
                        "login" => p.login = Some(v),
                        "password" => p.password = Some(v),
                        "token" => p.token = Some(v),
                        _ => {}
                    }
                }
                "macdef" => return Err(Error::Macro),
                _ => return Err(Error::Unknown(keyword.clone())),
            }
        }
        finish(current, &mut entries)?;
        Ok(AuthFile { entries })
    }

    /// The credential for a cache at `host` (lower-case, no brackets) and `port` (the
    /// URL's, explicit or not): `host:port`, then `host`, then `default`.
    pub fn for_host(&self, host: &str, port: Option<u16>) -> Option<&Credential> {
        let host = host.to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        let find = |want: Option<&str>| {
            self.entries
                .iter()
                .find(|(m, _)| m.as_deref() == want)
                .map(|(_, c)| c)
        };
        with_port
            .as_deref()
            .and_then(|hp| find(Some(hp)))
            .or_else(|| find(Some(&host)))
            .or_else(|| find(None))
    }
}

/// Splits on whitespace, honouring double quotes; `#` starts a comment outside quotes.
fn words(text: &str) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&c) = chars.peek() else {
            return Ok(out);
        };
        if c == '#' {
            while chars.next_if(|c| *c != '\n').is_some() {}
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next().ok_or(Error::Quote)? {
                    '"' => break,
                    '\\' => word.push(chars.next().ok_or(Error::Quote)?),
                    other => word.push(other),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        out.push(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(login: &str, password: &str) -> Credential {
        Credential::Basic {
            login: login.into(),
            password: password.into(),
        }
    }

    #[test]
    fn netrc_entries_by_host_port_then_host_then_default() {
        let f = AuthFile::parse(
            "# push credentials\n\
             machine cache.example.org login ci password s3cret\n\
             machine Cache.Example.org:8443 token \"tok en\"\n\
             machine other account x login \"a b\" password \"q\\\"uote\"\n\
             default login anon password guest # the rest\n",
        )
        .unwrap();
        assert_eq!(
            f.for_host("cache.example.org", Some(443)),
            Some(&basic("ci", "s3cret"))
        );
        assert_eq!(
            f.for_host("CACHE.example.org", Some(8443)),
            Some(&Credential::Bearer("tok en".into()))
        );
        assert_eq!(f.for_host("other", None), Some(&basic("a b", "q\"uote")));
        assert_eq!(f.for_host("elsewhere", None), Some(&basic("anon", "guest")));
        let none = AuthFile::parse("machine a login b password c").unwrap();
        assert_eq!(none.for_host("cache.nixos.org", Some(443)), None);
        assert_eq!(
            AuthFile::parse("  \n# nothing\n").unwrap(),
            AuthFile::default()
        );
    }

    #[test]
    fn headers() {
        // RFC 7617's example.
        assert_eq!(
            basic("Aladdin", "open sesame").header(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(Credential::Bearer("t".into()).header(), "Bearer t");
        assert!(!format!("{:?}", basic("u", "secret")).contains("secret"));
        assert!(!format!("{:?}", Credential::Bearer("secret".into())).contains("secret"));
    }

    #[test]
    fn mistakes_are_named_without_secrets() {
        let err = |t: &str| AuthFile::parse(t).unwrap_err().to_string();
        assert!(err("machine h login u").contains("h: has a login but no password"));
        assert!(err("machine h password p").contains("no login"));
        assert!(err("machine h login u password p token t").contains("both"));
        assert!(err("machine h").contains("h: has no login"));
        assert!(err("machine").contains("`machine` has no value"));
        assert!(err("machine h login u passwd p").contains("\"passwd\""));
        assert!(err("machine h macdef init").contains("macdef"));
        assert!(err("machine h login \"u").contains("quote"));
        let outside = err("password hunter2 machine h login u password p");
        assert!(outside.contains("`password` before"), "{outside}");
        assert!(!outside.contains("hunter2"), "{outside}");
    }
}
