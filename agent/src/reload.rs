//! SIGHUP (`systemctl reload`): the configuration files are read again and
//! what can change while running is applied — the log filter and the
//! write-back timings — with `RELOADING=1` and then `READY=1` to systemd.
//! A value given by a flag or by the process's own environment stays (they
//! win over the file); a key whose change needs a restart is said so in
//! the log.

use std::collections::BTreeMap;

use crate::config_file::FromFiles;
use crate::writeback_loop::WriteBack;

/// What a reload can change: key, its variable, its flag, its default.
const LIVE: &[(&str, &str, &str, u64)] = &[
    (
        "writeback_quiet_ms",
        "SESSIONFS_WRITEBACK_QUIET_MS",
        "--writeback-quiet-ms",
        2000,
    ),
    (
        "writeback_max_lag_ms",
        "SESSIONFS_WRITEBACK_MAX_LAG_MS",
        "--writeback-max-lag-ms",
        30_000,
    ),
    ("follow_ms", "SESSIONFS_FOLLOW_MS", "--follow-ms", 2000),
];

/// Runs until the process ends: one reload per SIGHUP.
pub async fn on_sighup(writeback: WriteBack) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        crate::sd_notify::notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let said = match reload(&writeback) {
            Ok(said) => {
                tracing::info!("configuration reloaded: {said}");
                format!("configuration reloaded: {said}")
            }
            Err(e) => {
                tracing::error!("configuration not reloaded: {e}");
                format!("configuration not reloaded: {e}")
            }
        };
        crate::sd_notify::notify(&format!("READY=1\nSTATUS={said}"));
    }
}

fn reload(writeback: &WriteBack) -> Result<String, String> {
    use clap::CommandFactory;
    let argv = crate::command_line();
    let now = crate::config_file::read(&argv, &crate::Cli::command())?;
    let before = crate::APPLIED
        .get()
        .map(|a| a.set.clone())
        .unwrap_or_default();
    // A flag on the command line, or a variable the process was given (not
    // one a file set at the start), wins over the file: it stays.
    let given = |env: &str, flag: &str| {
        let on_line = argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        on_line || (std::env::var_os(env).is_some() && !before.contains_key(env))
    };
    let mut changed = Vec::new();
    // The log filter: the file's, else RUST_LOG or the default.
    if !given("SESSIONFS_LOG", "--log") {
        let text = match now.get("SESSIONFS_LOG") {
            Some((v, _)) => v.clone(),
            None => crate::logging::filter_text(None).0,
        };
        crate::logging::set_filter(&text)?;
        changed.push(format!("log {text:?}"));
    }
    let policy = writeback.policy();
    let mut values = BTreeMap::new();
    for (key, env, flag, default) in LIVE {
        let current = match *key {
            "writeback_quiet_ms" => policy.quiet_ms,
            "writeback_max_lag_ms" => policy.max_lag_ms,
            _ => policy.follow_ms,
        };
        let value = if given(env, flag) {
            current
        } else {
            match now.get(*env) {
                Some((v, path)) => v
                    .parse()
                    .map_err(|_| format!("{key} = {v:?} in {}: not a number", path.display()))?,
                None => *default,
            }
        };
        if value != current {
            changed.push(format!("{key} {value}"));
        }
        values.insert(*key, value);
    }
    writeback.set_timings(
        values["writeback_quiet_ms"],
        values["writeback_max_lag_ms"],
        values["follow_ms"],
    );
    for (env, (value, path)) in &now {
        let live = env == "SESSIONFS_LOG" || LIVE.iter().any(|(_, e, _, _)| e == env);
        // The environment's own value wins over the file anyway.
        let overridden = std::env::var_os(env).is_some() && !before.contains_key(env);
        if !live && !overridden && before.get(env).map(|(v, _)| v) != Some(value) {
            tracing::warn!(
                "{env} changed in {}; it takes effect at the next start",
                path.display()
            );
        }
    }
    report_removed(&before, &now);
    Ok(if changed.is_empty() {
        "nothing changed".to_owned()
    } else {
        changed.join(", ")
    })
}

/// Keys a file no longer holds, that only a restart lets go.
fn report_removed(before: &FromFiles, now: &FromFiles) {
    for (env, (_, path)) in before {
        let live = env == "SESSIONFS_LOG" || LIVE.iter().any(|(_, e, _, _)| e == env);
        if !live && !now.contains_key(env) {
            tracing::warn!(
                "{env} was removed from {}; it takes effect at the next start",
                path.display()
            );
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `RELOADING=1` wants it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
