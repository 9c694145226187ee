//! `banger ops`: operations in flight or finished, watched and cancelled.

use super::*;

pub(super) fn run(client: &mut Client, command: OpsCommand, now: Timestamp) -> Result<(), Failure> {
    match command {
        OpsCommand::Ls { all, json } => {
            let ops =
                client.call::<OperationsResult>("daemon.operations.list", json!({"all": all}))?;
            show(json, &ops.result.operations, |v| {
                output::operations_table(v, now)
            });
        }
        OpsCommand::Show { op_id, json } => {
            let op =
                client.call::<OperationResult>("daemon.operations.get", json!({"op_id": op_id}))?;
            show(json, &op.result.operation, |v| {
                output::operation_details(v, now)
            });
        }
        OpsCommand::Cancel { op_id } => {
            client.call::<OperationResult>("daemon.operations.cancel", json!({"op_id": op_id}))?;
            println!("cancel requested for {op_id}");
        }
        OpsCommand::Watch { op_id, json } => {
            let mut stdout = std::io::stdout();
            let op = client.call_with_progress::<OperationResult>(
                "daemon.operations.watch",
                json!({"op_id": op_id}),
                |p| {
                    let line = if json {
                        serde_json::to_string(p).unwrap_or_default()
                    } else {
                        output::progress(&p.phase, p.current, p.total)
                    };
                    let _ = writeln!(stdout, "{line}");
                },
            )?;
            let op = op.result.operation;
            if json {
                println!("{}", serde_json::to_string(&op).unwrap_or_default());
            } else {
                println!("{} {}", op.op_id, crate::wire_name(&op.outcome));
            }
            return ended(&op);
        }
    }
    Ok(())
}
