//! Store latency through the StoreActor, as the daemon uses it: a durable
//! single-record write, and listing 1,000 VM records. Prints p50/p99 and
//! writes them to `target/bench-results/store.txt`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::Instant;

use banger::actors::store::{List, Put, StoreActor};
use banger::store::{self, Schema};
use banger::vm::record::VmRecord;

const WRITES: usize = 500;
const LISTED: usize = 1_000;
const LISTS: usize = 200;

fn main() -> anyhow::Result<()> {
    let tmp = common::state_dir();
    let opened = store::open(tmp.path(), Schema::production())?;
    let report = actix::System::new().block_on(async move {
        let (addr, _closed) = StoreActor::start(opened.store, 2);

        let mut writes = Vec::with_capacity(WRITES);
        for i in 0..WRITES {
            let record = common::vm_record(i);
            let start = Instant::now();
            addr.send(Put(record)).await??;
            writes.push(start.elapsed());
        }
        for i in WRITES..LISTED {
            addr.send(Put(common::vm_record(i))).await??;
        }

        let mut lists = Vec::with_capacity(LISTS);
        for _ in 0..LISTS {
            let start = Instant::now();
            let vms = addr.send(List::<VmRecord>::new()).await??;
            lists.push(start.elapsed());
            anyhow::ensure!(
                vms.records.len() == LISTED,
                "listed {} VMs",
                vms.records.len()
            );
        }
        let mut report = String::new();
        write!(
            report,
            "{}",
            common::summary("durable single-record write", &writes)
        )?;
        write!(
            report,
            "{}",
            common::summary("list 1000 VM records", &lists)
        )?;
        anyhow::Ok(report)
    })?;

    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("store.txt"), &report)?;
    Ok(())
}
