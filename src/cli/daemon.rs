//! `banger daemon`: status, backups, the methods it serves.

use super::*;

pub(super) fn run(client: &mut Client, command: DaemonCommand) -> Result<(), Failure> {
    match command {
        DaemonCommand::Status { json } => {
            let status = client.call::<StatusResult>("daemon.status", json!({}))?;
            show(json, &status, |s| status_view(&s.result));
        }
        DaemonCommand::Backup {
            path,
            rate_limit,
            json,
        } => {
            // A bare name is the daemon's to place in its backup directory.
            let path = if path.components().count() == 1 {
                path
            } else {
                absolute(&path)?
            };
            let params = json!({"path": path, "rate_limit": rate_limit});
            let mut stderr = std::io::stderr();
            let result =
                client.call_with_progress::<BackupResult>("daemon.backup", params, |p| {
                    let _ = writeln!(stderr, "{}", output::progress(&p.phase, p.current, p.total));
                })?;
            if json {
                println!("{}", output::json(&result));
            } else {
                let r = result.result;
                println!(
                    "backup written to {} ({} records, {} bytes)",
                    r.path.display(),
                    r.records,
                    r.bytes
                );
            }
        }
        DaemonCommand::Methods { json } => {
            let methods = client.call::<MethodsResult>("daemon.methods", json!({}))?;
            if json {
                println!("{}", output::json(&methods.result.methods));
            } else {
                let mut rows = vec![vec!["METHOD".to_string(), "DESCRIPTION".to_string()]];
                rows.extend(
                    methods
                        .result
                        .methods
                        .into_iter()
                        .map(|m| vec![m.name, m.summary]),
                );
                print!("{}", output::table(&rows));
            }
        }
    }
    Ok(())
}

fn status_view(status: &StatusResult) -> String {
    let list = |items: Vec<String>| items.join(", ");
    let mut rows = vec![
        vec!["version:".into(), status.version.clone()],
        vec!["pid:".into(), status.pid.to_string()],
        vec!["mode:".into(), status.mode.clone()],
        vec![
            "uptime:".into(),
            format!(
                "{} (since {})",
                output::duration(status.uptime_seconds),
                status.started_at
            ),
        ],
        vec!["state dir:".into(), status.state_dir.display().to_string()],
        vec!["socket:".into(), status.socket.display().to_string()],
        vec!["store:".into(), status.store.path.display().to_string()],
        vec![
            "writes:".into(),
            status
                .store
                .unavailable
                .clone()
                .unwrap_or_else(|| "ok".into()),
        ],
        vec![
            "schema:".into(),
            list(
                status
                    .store
                    .tables
                    .iter()
                    .map(|(t, v)| format!("{t} v{v}"))
                    .collect(),
            ),
        ],
        vec![
            "records:".into(),
            list(
                status
                    .store
                    .records
                    .iter()
                    .map(|(t, n)| format!("{t} {n}"))
                    .collect(),
            ),
        ],
        vec![
            "operations:".into(),
            format!("{} running", status.operations_running),
        ],
    ];
    for bad in &status.quarantined {
        rows.push(vec![
            "quarantined:".into(),
            format!("{} {}: {}", bad.table, bad.key, bad.reason),
        ]);
    }
    output::table(&rows)
}
