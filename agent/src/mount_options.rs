//! `-o` options, as mount(8), `/etc/fstab` and systemd mount units give
//! them, turned into the flags they stand for; and the mount(8) helper
//! (`mount.fuse.sessionfs`, a link to this binary) that makes
//! `mount -t fuse.sessionfs SESSION DIR -o …` and fstab lines work.
//!
//! Options become ordinary flags before the command line is parsed, so
//! their values are checked by the same parsers as the flags' own; an
//! option nobody knows is an error naming it (or, with mount's `-s`, a
//! warning).

use std::ffi::OsString;

/// One `-o` option and the flag it stands for.
struct Known {
    name: &'static str,
    /// The flag; `None` for options that only mean something to mount(8)
    /// or systemd, or that a sessionfs mount always does.
    flag: Option<&'static str>,
    /// Whether it takes `=VALUE`.
    value: bool,
}

const fn flag(name: &'static str, flag: &'static str) -> Known {
    Known {
        name,
        flag: Some(flag),
        value: false,
    }
}

const fn valued(name: &'static str, flag: &'static str) -> Known {
    Known {
        name,
        flag: Some(flag),
        value: true,
    }
}

const fn ignored(name: &'static str) -> Known {
    Known {
        name,
        flag: None,
        value: false,
    }
}

const KNOWN: &[Known] = &[
    flag("ro", "--read-only"),
    ignored("rw"),
    flag("allow_other", "--allow-other"),
    valued("subdir", "--subdir"),
    flag("create", "--create"),
    flag("nonempty", "--allow-non-empty"),
    flag("allow_non_empty", "--allow-non-empty"),
    flag("offline", "--offline"),
    valued("threads", "--threads"),
    valued("read_timeout", "--read-timeout-secs"),
    valued("overlay_dir", "--overlay-dir"),
    valued("cache_dir", "--cache-dir"),
    valued("cache_size", "--cache-size"),
    valued("bucket", "--bucket"),
    valued("store", "--store"),
    valued("store_dir", "--store-dir"),
    valued("endpoint", "--s3-endpoint"),
    valued("region", "--s3-region"),
    valued("writeback_quiet_ms", "--writeback-quiet-ms"),
    valued("writeback_max_lag_ms", "--writeback-max-lag-ms"),
    valued("follow_ms", "--follow-ms"),
    flag("no_writeback", "--no-writeback"),
    valued("metrics_addr", "--metrics-addr"),
    valued("log", "--log"),
    valued("uid", "--uid"),
    valued("gid", "--gid"),
    valued("umask", "--umask"),
    valued("file_mode", "--file-mode"),
    valued("dir_mode", "--dir-mode"),
    // mount(8) and systemd's own, and what every sessionfs mount does anyway.
    ignored("defaults"),
    ignored("auto"),
    ignored("noauto"),
    ignored("nofail"),
    ignored("_netdev"),
    ignored("user"),
    ignored("users"),
    ignored("nouser"),
    ignored("owner"),
    ignored("group"),
    ignored("nosuid"),
    ignored("nodev"),
    ignored("exec"),
    ignored("async"),
    ignored("atime"),
    ignored("noatime"),
    ignored("relatime"),
    ignored("strictatime"),
    ignored("lazytime"),
    ignored("diratime"),
    ignored("nodiratime"),
    ignored("default_permissions"),
];

/// Why an option is refused even though it is well known.
fn refused(name: &str) -> Option<&'static str> {
    match name {
        "suid" | "dev" => Some("sessionfs mounts are always nosuid,nodev"),
        "allow_root" => Some("use allow_other"),
        _ => None,
    }
}

/// The flags `opts` (comma-separated, as after `-o`) stand for. `sloppy`
/// (mount's `-s`) turns unknown options into warnings.
pub fn to_flags(opts: &str, sloppy: bool) -> Result<Vec<String>, String> {
    let mut flags = Vec::new();
    for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        // systemd's and fstab's own annotations.
        if name.starts_with("x-") || name == "comment" {
            continue;
        }
        if let Some(why) = refused(name) {
            return Err(format!("mount option {name:?} is not supported: {why}"));
        }
        let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
            if sloppy {
                eprintln!("sessionfs: ignoring unknown mount option {name:?}");
                continue;
            }
            return Err(format!(
                "unknown mount option {name:?}; sessionfs knows: {}",
                KNOWN
                    .iter()
                    .filter(|k| k.flag.is_some())
                    .map(|k| if k.value {
                        format!("{}=…", k.name)
                    } else {
                        k.name.to_owned()
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        match (known.value, value) {
            (true, Some(v)) if !v.is_empty() => {
                flags.push(known.flag.unwrap_or_default().to_owned());
                flags.push(v.to_owned());
            }
            (true, _) => return Err(format!("mount option {name:?} needs a value: {name}=…")),
            (false, Some(_)) => return Err(format!("mount option {name:?} takes no value")),
            (false, None) => flags.extend(known.flag.map(str::to_owned)),
        }
    }
    Ok(flags)
}

/// A command line whose `mount` has `-o` options, with each option turned
/// into its flag: `sessionfs mount S DIR -o ro,subdir=w` becomes
/// `sessionfs mount S DIR --read-only --subdir w`.
pub fn expand(argv: &[OsString]) -> Result<Vec<OsString>, String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut flags = Vec::new();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        let opts = if text == "-o" || text == "--options" {
            it.next()
                .ok_or("-o needs options, e.g. -o ro,subdir=workspace")?
                .to_string_lossy()
                .into_owned()
        } else if let Some(rest) = text.strip_prefix("--options=") {
            rest.to_owned()
        } else if let Some(rest) = text.strip_prefix("-o").filter(|_| !text.starts_with("--")) {
            rest.to_owned()
        } else {
            out.push(arg.clone());
            continue;
        };
        flags.extend(to_flags(&opts, false)?);
    }
    out.extend(flags.into_iter().map(OsString::from));
    Ok(out)
}

/// When this binary runs as mount(8)'s helper (`mount.fuse.sessionfs`, or
/// `mount.sessionfs`), the `sessionfs mount` command line its arguments
/// mean: `SESSION DIR [-sfnv] [-o OPTS] [-t TYPE] [-N NS]`, mounted in the
/// background (`--daemon`) so mount(8) returns once the mount is live.
/// `Ok(None)` for `-f` (fake: check only). `None` when not the helper.
pub fn from_helper(argv: &[OsString]) -> Option<Result<Option<Vec<OsString>>, String>> {
    let name = std::path::Path::new(argv.first()?)
        .file_name()?
        .to_string_lossy();
    if name != "mount.fuse.sessionfs" && name != "mount.sessionfs" {
        return None;
    }
    Some(helper_args(&argv[1..]))
}

fn helper_args(args: &[OsString]) -> Result<Option<Vec<OsString>>, String> {
    let usage = "usage: mount.fuse.sessionfs SESSION DIR [-sfnv] [-o OPTIONS]";
    let mut positional = Vec::new();
    let (mut opts, mut sloppy, mut fake) = (Vec::new(), false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy().into_owned();
        match text.as_str() {
            "-o" => opts.push(
                it.next()
                    .ok_or_else(|| format!("-o needs options; {usage}"))?
                    .to_string_lossy()
                    .into_owned(),
            ),
            // The filesystem type mount(8) passes along; it is ours.
            "-t" => {
                it.next();
            }
            "-N" => return Err("mount namespaces (-N) are not supported".into()),
            t if t.starts_with("-o") => opts.push(t[2..].to_owned()),
            t if t.starts_with('-') && t.len() > 1 => {
                for c in t[1..].chars() {
                    match c {
                        's' => sloppy = true,
                        'f' => fake = true,
                        // No mtab to write; nothing more to say.
                        'n' | 'v' => {}
                        other => return Err(format!("unknown flag -{other}; {usage}")),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [session, dir] = positional.as_slice() else {
        return Err(usage.to_owned());
    };
    let mut flags = Vec::new();
    for o in &opts {
        flags.extend(to_flags(o, sloppy)?);
    }
    if fake {
        return Ok(None);
    }
    let mut argv: Vec<OsString> = vec!["sessionfs".into(), "mount".into()];
    argv.extend([session.clone(), dir.clone(), "--daemon".into()]);
    argv.extend(flags.into_iter().map(OsString::from));
    Ok(Some(argv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn options_become_flags() {
        assert_eq!(
            to_flags(
                "ro,allow_other,subdir=workspace,cache_size=64,_netdev,x-systemd.automount,nofail",
                false
            )
            .unwrap(),
            [
                "--read-only",
                "--allow-other",
                "--subdir",
                "workspace",
                "--cache-size",
                "64"
            ]
        );
        assert!(to_flags("bogus", false).unwrap_err().contains("\"bogus\""));
        assert!(to_flags("bogus", true).unwrap().is_empty());
        assert!(to_flags("suid", true)
            .unwrap_err()
            .contains("not supported"));
        assert_eq!(
            to_flags("uid=1000,umask=022", false).unwrap(),
            ["--uid", "1000", "--umask", "022"]
        );
        assert!(to_flags("subdir", false)
            .unwrap_err()
            .contains("needs a value"));
        assert!(to_flags("ro=1", false)
            .unwrap_err()
            .contains("takes no value"));
    }

    #[test]
    fn a_mount_command_line_is_expanded() {
        let got = expand(&os(&[
            "sessionfs",
            "mount",
            "s",
            "/m",
            "-o",
            "ro",
            "-osubdir=w",
        ]))
        .unwrap();
        assert_eq!(
            got,
            os(&[
                "sessionfs",
                "mount",
                "s",
                "/m",
                "--read-only",
                "--subdir",
                "w"
            ])
        );
    }

    #[test]
    fn the_helper_speaks_mount8() {
        assert!(from_helper(&os(&["sessionfs", "x"])).is_none());
        let got = from_helper(&os(&[
            "/sbin/mount.fuse.sessionfs",
            "acme__web__main",
            "/mnt/w",
            "-n",
            "-o",
            "rw,subdir=workspace,_netdev",
            "-t",
            "fuse.sessionfs",
        ]))
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            os(&[
                "sessionfs",
                "mount",
                "acme__web__main",
                "/mnt/w",
                "--daemon",
                "--subdir",
                "workspace"
            ])
        );
        let fake = from_helper(&os(&["mount.fuse.sessionfs", "s", "/m", "-f", "-o", "ro"]));
        assert!(fake.unwrap().unwrap().is_none());
        let err = from_helper(&os(&["mount.fuse.sessionfs", "s"])).unwrap();
        assert!(err.unwrap_err().starts_with("usage:"));
    }
}
