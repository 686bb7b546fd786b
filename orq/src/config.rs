//! Config files for `orq server` and `orq agent`, as k3s reads `/etc/rancher/k3s/config.yaml`:
//! a YAML mapping whose keys are the command's long flag names (`data-dir: /srv/orq`,
//! `controllers: ["*", "-nodeipam"]`, `no-agent: true`). Its settings become flags ahead of
//! the command line's, so a flag given on the command line wins; an unknown key is an error
//! naming the file and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Read when `--config` and `ORQ_CONFIG` name no file, if it exists.
pub const DEFAULT_PATH: &str = "/etc/orquestra/config.yaml";

/// The commands that read a config file.
const COMMANDS: &[&str] = &["server", "agent"];

/// `args` (the process's, program name first) with the config file's settings inserted
/// after the subcommand.
pub fn expand(args: Vec<OsString>, command: &clap::Command) -> anyhow::Result<Vec<OsString>> {
    let Some(sub) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(args);
    };
    if !COMMANDS.contains(&sub) {
        return Ok(args);
    }
    let Some(path) = config_path(&args[2..]) else {
        return Ok(args);
    };
    let Some(sub_command) = command.find_subcommand(sub) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let flags = flags(&path, &text, sub_command, &args[2..])?;
    let mut expanded = args[..2].to_vec();
    expanded.extend(flags);
    expanded.extend_from_slice(&args[2..]);
    Ok(expanded)
}

/// `--config FILE`, `--config=FILE`, `$ORQ_CONFIG`, or [`DEFAULT_PATH`] when it exists.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    if let Some(path) = std::env::var_os("ORQ_CONFIG") {
        return Some(PathBuf::from(path));
    }
    Path::new(DEFAULT_PATH)
        .exists()
        .then(|| PathBuf::from(DEFAULT_PATH))
}

/// The flags a config file stands for, leaving out those `cli` sets itself.
fn flags(
    path: &Path,
    text: &str,
    command: &clap::Command,
    cli: &[OsString],
) -> anyhow::Result<Vec<OsString>> {
    let settings: serde_yaml::Mapping = match serde_yaml::from_str(text) {
        Ok(serde_yaml::Value::Null) => return Ok(Vec::new()),
        Ok(value) => serde_yaml::from_value(value).with_context(|| {
            format!("{}: not a mapping of flag names to values", path.display())
        })?,
        Err(e) => bail!("{}: {e}", path.display()),
    };
    let on_cli = |name: &str| {
        cli.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{name}") || a.starts_with(&format!("--{name}="))
        })
    };
    let mut flags = Vec::new();
    for (key, value) in settings {
        let Some(name) = key.as_str() else {
            bail!("{}: the key {key:?} is not a flag name", path.display());
        };
        let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(name)) else {
            bail!(
                "{}: unknown setting `{name}` (not a flag of `orq {}`; see `orq {} --help`)",
                path.display(),
                command.get_name(),
                command.get_name()
            );
        };
        if name == "config" || on_cli(name) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &serde_yaml::Value| -> anyhow::Result<String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                other => bail!(
                    "{}: `{name}` must be a string, number or boolean, not {other:?}",
                    path.display()
                ),
            }
        };
        match value {
            serde_yaml::Value::Bool(on) if !takes_value => {
                if on {
                    flags.push(OsString::from(format!("--{name}")));
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in &items {
                    flags.push(OsString::from(format!("--{name}={}", scalar(item)?)));
                }
            }
            other => flags.push(OsString::from(format!("--{name}={}", scalar(&other)?))),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn expand_with(config: &str, cli: &[&str]) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config)?;
        let mut args: Vec<OsString> = vec!["orq".into(), "server".into()];
        args.push(format!("--config={}", path.display()).into());
        args.extend(cli.iter().map(OsString::from));
        let out = expand(args, &crate::Cli::command())?;
        Ok(out
            .into_iter()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| !a.starts_with("--config="))
            .collect())
    }

    #[test]
    fn settings_become_flags_and_the_command_line_wins() {
        let flags = expand_with(
            "data-dir: /srv/orq\nlisten: 0.0.0.0:7443\ncontrollers: ['*', -nodeipam]\nno-agent: true\ncompaction-interval-seconds: 60\n",
            &["--listen", "127.0.0.1:6443"],
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--data-dir=/srv/orq",
                "--controllers=*",
                "--controllers=-nodeipam",
                "--no-agent",
                "--compaction-interval-seconds=60",
                "--listen",
                "127.0.0.1:6443",
            ]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let error = expand_with("data_dir: /srv\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown setting `data_dir` (not a flag of `orq server`"),
            "{error}"
        );
        let error = expand_with("listen: {a: 1}\n", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("`listen` must be a string"), "{error}");
        let error = expand_with("- a\n", &[]).unwrap_err().to_string();
        assert!(error.contains("not a mapping"), "{error}");
    }
}
