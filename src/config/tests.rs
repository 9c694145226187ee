use super::*;

fn user_defaults(runtime: Option<&str>) -> Defaults {
    Defaults {
        config: "/home/u/.config/banger/bangerd.toml".into(),
        state_dir: "/home/u/.local/state/banger".into(),
        runtime_dir: runtime.map(PathBuf::from),
    }
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let config = resolve(
        Mode::User,
        &user_defaults(Some("/run/user/1000/banger")),
        ConfigFile::default(),
        Overrides::default(),
    )
    .expect("config");
    assert_eq!(
        config.state_dir,
        PathBuf::from("/home/u/.local/state/banger")
    );
    assert_eq!(
        config.socket,
        PathBuf::from("/run/user/1000/banger/bangerd.sock")
    );
    assert_eq!(config.log_level, "info");
}

#[test]
fn a_jail_dir_that_is_the_state_dir_or_inside_vms_is_refused() {
    for jail_dir in ["/srv/banger", "/srv/banger/vms/jail"] {
        let file = ConfigFile::parse(
            &format!("[firecracker]\njail_dir = \"{jail_dir}\"\n"),
            Path::new("bangerd.toml"),
        )
        .expect("parse");
        let overrides = Overrides {
            state_dir: Some("/srv/banger".into()),
            ..Overrides::default()
        };
        let refused = resolve(Mode::User, &user_defaults(None), file, overrides);
        assert!(
            matches!(
                refused,
                Err(ConfigError::Invalid {
                    key: "firecracker.jail_dir",
                    ..
                })
            ),
            "{jail_dir}: {refused:?}"
        );
    }
}

#[test]
fn without_a_runtime_dir_the_socket_lives_under_the_state_dir() {
    let config = resolve(
        Mode::User,
        &user_defaults(None),
        ConfigFile::default(),
        Overrides {
            state_dir: Some("/srv/banger".into()),
            ..Overrides::default()
        },
    )
    .expect("config");
    assert_eq!(config.socket, PathBuf::from("/srv/banger/run/bangerd.sock"));
}

#[test]
fn overrides_win_over_the_file() {
    let file = ConfigFile::parse(
        "state_dir = \"/from/file\"\nlog_level = \"debug\"\n",
        Path::new("x.toml"),
    )
    .expect("parse");
    let config = resolve(
        Mode::System,
        &user_defaults(None),
        file,
        Overrides {
            state_dir: Some("/from/flag".into()),
            ..Overrides::default()
        },
    )
    .expect("config");
    assert_eq!(config.state_dir, PathBuf::from("/from/flag"));
    assert_eq!(config.log_level, "debug");
}

#[test]
fn unknown_keys_and_bad_values_name_the_field() {
    let err = ConfigFile::parse("stat_dir = \"/x\"\n", Path::new("b.toml")).expect_err("unknown");
    assert!(err.to_string().contains("stat_dir"), "{err}");

    let file = ConfigFile::parse("state_dir = \"relative\"\n", Path::new("b.toml")).expect("parse");
    let err = resolve(Mode::User, &user_defaults(None), file, Overrides::default())
        .expect_err("relative");
    assert!(err.to_string().starts_with("invalid state_dir"), "{err}");

    let file = ConfigFile::parse("log_level = \"[[\"\n", Path::new("b.toml")).expect("parse");
    let err =
        resolve(Mode::User, &user_defaults(None), file, Overrides::default()).expect_err("level");
    assert!(err.to_string().starts_with("invalid log_level"), "{err}");
}

#[test]
fn the_documented_config_parses_and_holds_the_defaults() {
    let text = include_str!("../../config/bangerd.toml");
    // Every key is documented commented out; uncommented, they parse.
    let uncommented: String = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("# ")
                .filter(|l| l.contains(" = ") || l.starts_with('['))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let file = ConfigFile::parse(&uncommented, Path::new("bangerd.toml")).expect("parse");
    let config = resolve(
        Mode::System,
        &user_defaults(None),
        file,
        Overrides::default(),
    )
    .expect("resolve");
    assert_eq!(config.log_level, "info");
    assert_eq!(config.socket_group, "banger");
    assert_eq!(config.retention, Retention::default());
    assert_eq!(config.state_dir, PathBuf::from("/var/lib/banger"));
    assert_eq!(config.socket, PathBuf::from("/run/banger/bangerd.sock"));
    assert_eq!(config.firecracker, PathBuf::from("firecracker"));
    assert_eq!(config.qemu, PathBuf::from("qemu-system-x86_64"));
    assert_eq!(config.qemu_accel, AccelChoice::Auto);
    assert_eq!(config.jailer, None);
    assert_eq!(config.jail_dir, PathBuf::from("/var/lib/banger/jail"));
    assert!(config.network.enabled);
    assert_eq!(config.network.group, DEFAULT_INTERFACE_GROUP);
    assert_eq!(config.network.mtu, 1500);
    assert_eq!(
        (config.restart_delay_ms, config.restart_max_delay_ms),
        (1_000, 60_000)
    );
    assert_eq!(config.io_stall, Duration::from_secs(30));
    assert_eq!(config.tool_uid, DEFAULT_TOOL_UID);
}
