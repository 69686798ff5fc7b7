//! The configuration file, key by key: every key `sessionfs config` lists
//! is taken from the file, loses to its environment variable, and falls
//! back to its default; a flag wins over all three (on a real command);
//! secrets are masked; unknown keys and broken files are named.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sessionfs_tests::sessionfs_bin;

fn sessionfs(home: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(sessionfs_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

fn config(home: &Path, file: &Path, vars: &[(&str, &str)]) -> Vec<Value> {
    let out = sessionfs(
        home,
        &["--config", &file.display().to_string(), "config", "--json"],
        vars,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn entry<'a>(list: &'a [Value], key: &str) -> &'a Value {
    list.iter().find(|e| e["key"] == key).unwrap()
}

#[test]
fn each_key_comes_from_the_file_loses_to_its_variable_and_has_its_default() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("config.toml");
    std::fs::write(&file, "").unwrap();
    let keys = config(home.path(), &file, &[]);
    assert!(keys.len() >= 25, "{keys:?}");
    for k in &keys {
        let key = k["key"].as_str().unwrap();
        let env = k["env"].as_str().unwrap();
        let default = k["value"].clone();
        // Values each key's parser takes (global flags are parsed for
        // `config` too).
        let (from_file, from_env) = match key {
            "log" => ("info", "debug"),
            "cache_dir" => ("/tmp/from-file", "/tmp/from-env"),
            "format_version" => ("1", "2"),
            _ if default.as_str().is_some_and(|d| d.parse::<u64>().is_ok()) => ("77", "78"),
            _ if default == "false" => ("true", "false"),
            _ => ("from-file", "from-env"),
        };
        let secret = ["secret", "password", "token"]
            .iter()
            .any(|w| key.contains(w) || env.to_lowercase().contains(w));
        let shown = |v: &str| {
            if secret {
                "********".to_owned()
            } else {
                v.to_owned()
            }
        };

        std::fs::write(&file, format!("{key} = \"{from_file}\"\n")).unwrap();
        let got = config(home.path(), &file, &[]);
        let e = entry(&got, key);
        assert_eq!(e["value"], shown(from_file), "{key}: {e}");
        assert_eq!(
            e["source"],
            format!("file {}", file.display()),
            "{key}: {e}"
        );

        let got = config(home.path(), &file, &[(env, from_env)]);
        let e = entry(&got, key);
        assert_eq!(e["value"], shown(from_env), "{key}: {e}");
        assert!(
            e["source"]
                .as_str()
                .unwrap()
                .starts_with(&format!("environment {env} (over ")),
            "{key}: {e}"
        );

        // The variable's name is a key too.
        std::fs::write(&file, format!("{env} = \"{from_file}\"\n")).unwrap();
        let got = config(home.path(), &file, &[]);
        assert_eq!(entry(&got, key)["value"], shown(from_file), "{env}");

        std::fs::write(&file, "").unwrap();
        let got = config(home.path(), &file, &[]);
        let e = entry(&got, key);
        assert!(
            e["source"] == "default" || e["source"] == "unset",
            "{key}: {e}"
        );
        assert_eq!(e["value"], default, "{key}: {e}");
    }
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let file = dir.join("config.toml");
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    std::fs::write(
        &file,
        format!("store = \"local\"\nstore_dir = \"{}\"\n", a.display()),
    )
    .unwrap();
    let check = |vars: &[(&str, &str)], flags: &[&str]| -> String {
        let mut args = vec!["--config", file.to_str().unwrap(), "store", "check"];
        args.extend_from_slice(flags);
        let out = sessionfs(dir, &args, vars);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let b_env = b.display().to_string();
    let c_flag = c.display().to_string();
    assert!(check(&[], &[]).contains(&format!("local:{}/", a.display())));
    assert!(check(&[("SESSIONFS_STORE_DIR", &b_env)], &[]).contains(&format!("local:{}/", b_env)));
    assert!(check(
        &[("SESSIONFS_STORE_DIR", &b_env)],
        &["--store-dir", &c_flag]
    )
    .contains(&format!("local:{c_flag}/")));

    // The user's file, without --config.
    let xdg = dir.join("xdg");
    std::fs::create_dir_all(xdg.join("sessionfs")).unwrap();
    std::fs::write(xdg.join("sessionfs/config.toml"), "bucket = \"from-xdg\"\n").unwrap();
    let out = sessionfs(
        dir,
        &["config", "--json"],
        &[("XDG_CONFIG_HOME", xdg.to_str().unwrap())],
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bucket = entry(list.as_array().unwrap(), "bucket");
    assert_eq!(bucket["value"], "from-xdg", "{bucket}");
}

#[test]
fn secrets_are_masked_and_bad_files_are_named() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("config.toml");
    std::fs::write(
        &file,
        "s3_secret_key = \"hunter2-secret\"\napi_token = \"tok-123\"\n",
    )
    .unwrap();
    let out = sessionfs(
        home.path(),
        &["--config", file.to_str().unwrap(), "config"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !text.contains("hunter2") && !text.contains("tok-123"),
        "{text}"
    );
    assert!(text.contains("********"), "{text}");

    std::fs::write(&file, "bukket = \"x\"\n").unwrap();
    let out = sessionfs(
        home.path(),
        &["--config", file.to_str().unwrap(), "config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("unknown key \"bukket\"") && said.contains(file.to_str().unwrap()),
        "{said}"
    );

    std::fs::write(&file, "bucket = \n").unwrap();
    let out = sessionfs(
        home.path(),
        &["--config", file.to_str().unwrap(), "config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(file.to_str().unwrap()));

    let out = sessionfs(
        home.path(),
        &["--config", "/nonexistent/x.toml", "config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml"));
}
