//! The configuration file: TOML, with the same keys as the flags (`bucket`,
//! `cache_size`, `writeback_quiet_ms`, …) or their environment variables
//! (`MINIO_BUCKET`, …). Read before the command line is parsed; each value
//! it holds becomes its environment variable unless that is set already, so
//! the precedence is flags > environment > file > defaults, by clap's own
//! rules. Files: `--config FILE` (or `SESSIONFS_CONFIG`) alone if given,
//! else `/etc/sessionfs/config.toml` and then
//! `$XDG_CONFIG_HOME/sessionfs/config.toml` (the user's wins). An unknown
//! key is an error naming it and its file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// One configurable value: its key, its environment variable, its default.
#[derive(Clone, Debug)]
pub struct Key {
    pub key: String,
    pub env: String,
    pub default: Option<String>,
}

/// Variables read outside clap (by the API and the process itself).
const EXTRA: &[(&str, &str)] = &[
    ("api_token", "SESSIONFS_API_TOKEN"),
    ("container_id", "CONTAINER_ID"),
];

/// Every key: each flag of any subcommand that has an environment variable.
pub fn keys(cmd: &clap::Command) -> Vec<Key> {
    let mut found: BTreeMap<String, Key> = BTreeMap::new();
    collect(cmd, &mut found);
    for (key, env) in EXTRA {
        found.insert(
            (*key).to_owned(),
            Key {
                key: (*key).to_owned(),
                env: (*env).to_owned(),
                default: None,
            },
        );
    }
    found.into_values().collect()
}

fn collect(cmd: &clap::Command, found: &mut BTreeMap<String, Key>) {
    for arg in cmd.get_arguments() {
        let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let key = long.replace('-', "_");
        // The file does not name another file.
        if key == "config" {
            continue;
        }
        let default = arg
            .get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned());
        found.entry(key.clone()).or_insert(Key {
            key,
            env: env.to_string_lossy().into_owned(),
            default,
        });
    }
    for sub in cmd.get_subcommands() {
        collect(sub, found);
    }
}

/// What the files set, and from where: environment variable → (value, file).
pub type FromFiles = BTreeMap<String, (String, PathBuf)>;

/// What [`apply`] did.
#[derive(Clone, Default)]
pub struct Applied {
    /// Variables the files set (the environment did not have them).
    pub set: FromFiles,
    /// Variables the files also gave but the environment had: it wins.
    pub overridden: FromFiles,
}

/// The files to read, most general first.
fn files(argv: &[OsString]) -> Vec<(PathBuf, bool)> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            if let Some(p) = it.next() {
                return vec![(PathBuf::from(p), true)];
            }
        } else if let Some(p) = a.strip_prefix("--config=") {
            return vec![(PathBuf::from(p), true)];
        }
    }
    if let Some(p) = std::env::var_os("SESSIONFS_CONFIG").filter(|p| !p.is_empty()) {
        return vec![(PathBuf::from(p), true)];
    }
    let mut out = vec![(PathBuf::from("/etc/sessionfs/config.toml"), false)];
    if let Some(user) = crate::xdg_dir("XDG_CONFIG_HOME", ".config", "sessionfs/config.toml") {
        out.push((user, false));
    }
    out
}

/// Reads the files and sets, for each value they hold, its environment
/// variable unless the environment has it. Call before any thread starts.
pub fn apply(argv: &[OsString], cmd: &clap::Command) -> Result<Applied, String> {
    let from_files = read(argv, cmd)?;
    let mut applied = Applied::default();
    for (env, (value, path)) in from_files {
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, &value);
            applied.set.insert(env, (value, path));
        } else {
            applied.overridden.insert(env, (value, path));
        }
    }
    Ok(applied)
}

/// What the files hold now, without touching the environment.
pub fn read(argv: &[OsString], cmd: &clap::Command) -> Result<FromFiles, String> {
    let keys = keys(cmd);
    let mut from_files = FromFiles::new();
    for (path, named) in files(argv) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A file named on purpose must be there; the usual places may not.
            Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("configuration file {}: {e}", path.display())),
        };
        for (env, value) in parse(&text, &path, &keys)? {
            from_files.insert(env, (value, path.clone()));
        }
    }
    Ok(from_files)
}

/// `sessionfs config`: every key, its effective value and where it came
/// from; secrets masked.
pub fn show(cmd: &clap::Command, applied: &Applied, json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut rows = Vec::new();
    for key in keys(cmd) {
        let (value, source) = match (std::env::var(&key.env).ok(), applied.set.get(&key.env)) {
            (Some(v), Some((_, path))) => (Some(v), format!("file {}", path.display())),
            (Some(v), None) => {
                let over = applied
                    .overridden
                    .get(&key.env)
                    .map(|(_, p)| format!(" (over {})", p.display()))
                    .unwrap_or_default();
                (Some(v), format!("environment {}{over}", key.env))
            }
            (None, _) => match &key.default {
                Some(d) => (Some(d.clone()), "default".to_owned()),
                None => (None, "unset".to_owned()),
            },
        };
        let value = match value {
            Some(_) if is_secret(&key) => Some("********".to_owned()),
            v => v,
        };
        rows.push((key, value, source));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(k, v, s)| {
                serde_json::json!({"key": k.key, "env": k.env, "value": v, "source": s})
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(list));
    }
    for (k, v, s) in rows {
        writeln!(out, "{:<24} {:<36} {s}", k.key, v.as_deref().unwrap_or("-"))?;
    }
    Ok(())
}

/// Environment variable → value, for every key of one file.
fn parse(text: &str, path: &Path, keys: &[Key]) -> Result<Vec<(String, String)>, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("configuration file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (name, value) in table {
        let Some(key) = keys
            .iter()
            .find(|k| k.key == name.replace('-', "_") || k.env == name)
        else {
            return Err(format!(
                "unknown key {name:?} in {} (`sessionfs config` lists the keys)",
                path.display()
            ));
        };
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                return Err(format!(
                    "key {name:?} in {}: a string, number or boolean, not {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        out.push((key.env.clone(), value));
    }
    Ok(out)
}

/// Whether a key's value must not be printed.
pub fn is_secret(key: &Key) -> bool {
    ["secret", "password", "token"]
        .iter()
        .any(|w| key.key.contains(w) || key.env.to_lowercase().contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<Key> {
        ["bucket:MINIO_BUCKET", "cache_size:SESSIONFS_CACHE_SIZE"]
            .iter()
            .map(|s| {
                let (k, e) = s.split_once(':').unwrap();
                Key {
                    key: k.into(),
                    env: e.into(),
                    default: None,
                }
            })
            .collect()
    }

    #[test]
    fn keys_are_flag_or_variable_names_and_unknown_ones_are_named() {
        let p = Path::new("/etc/x.toml");
        let got = parse("bucket = \"b\"\ncache-size = 64\n", p, &keys()).unwrap();
        assert_eq!(
            got,
            [
                ("MINIO_BUCKET".to_owned(), "b".to_owned()),
                ("SESSIONFS_CACHE_SIZE".to_owned(), "64".to_owned())
            ]
        );
        assert_eq!(parse("MINIO_BUCKET = \"c\"", p, &keys()).unwrap()[0].1, "c");
        let e = parse("bukket = 1", p, &keys()).unwrap_err();
        assert!(e.contains("\"bukket\"") && e.contains("/etc/x.toml"), "{e}");
        assert!(parse("[s3]\nx = 1", p, &keys()).is_err());
        assert!(parse("bucket = ", p, &keys())
            .unwrap_err()
            .contains("/etc/x.toml"));
    }
}
