//! StoreActor through actix messages, and durability: every write the actor
//! acknowledged survives a SIGKILL of the process that made it.

mod common;

use std::io::{BufRead, BufReader, Write};

use banger::actors::store::{CompareAndSwap, Delete, Get, List, Put, StoreActor};
use banger::store::{self, Schema, StoreError};
use banger::vm::phase::Phase;
use banger::vm::record::VmRecord;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[actix::test]
async fn messages_read_write_and_compare_and_swap() {
    let tmp = state_dir();
    let opened = store::open(tmp.path(), Schema::production()).expect("open");
    let (addr, _closed) = StoreActor::start(opened.store, 2);
    assert!(addr.connected());

    let vm = vm_record(1);
    addr.send(Put(vm.clone()))
        .await
        .expect("mailbox")
        .expect("put");
    let got = addr
        .send(Get::<VmRecord>::new("vm-1"))
        .await
        .expect("mailbox")
        .expect("get");
    assert_eq!(got.as_ref(), Some(&vm));

    let mut running = vm.clone();
    running.phase = Phase::Running;
    // A writer holding a stale copy loses.
    let stale = CompareAndSwap {
        key: "vm-1".into(),
        expected: Some(running.clone()),
        new: Some(vm.clone()),
    };
    let err = addr
        .send(stale)
        .await
        .expect("mailbox")
        .expect_err("stale expectation");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    // The writer holding the current copy wins.
    let fresh = CompareAndSwap {
        key: "vm-1".into(),
        expected: Some(vm.clone()),
        new: Some(running.clone()),
    };
    addr.send(fresh).await.expect("mailbox").expect("swap");
    let got = addr
        .send(Get::<VmRecord>::new("vm-1"))
        .await
        .expect("mailbox")
        .expect("get");
    assert_eq!(got.map(|v| v.phase), Some(Phase::Running));
    // Absent-expected creates only when absent.
    let create = CompareAndSwap {
        key: "vm-1".into(),
        expected: None,
        new: Some(vm_record(1)),
    };
    assert!(addr.send(create).await.expect("mailbox").is_err());

    addr.send(Put(vm_record(2)))
        .await
        .expect("mailbox")
        .expect("put");
    let all = addr
        .send(List::<VmRecord>::new())
        .await
        .expect("mailbox")
        .expect("list");
    assert_eq!(all.records.len(), 2);
    assert!(
        addr.send(Delete::<VmRecord>::new("vm-2"))
            .await
            .expect("mailbox")
            .expect("delete")
    );
    assert!(
        !addr
            .send(Delete::<VmRecord>::new("vm-2"))
            .await
            .expect("mailbox")
            .expect("delete")
    );
}

/// Child process: writes through the StoreActor and acknowledges each
/// record on stdout only after the actor answered.
#[test]
#[ignore = "child process of every_acknowledged_write_survives_sigkill"]
fn acknowledging_writer_child() {
    let Some(dir) = child_dir() else { return };
    let system = actix::System::new();
    system.block_on(async {
        let opened = store::open(&dir, Schema::production()).expect("open in child");
        let (addr, _closed) = StoreActor::start(opened.store, 2);
        let mut stdout = std::io::stdout().lock();
        for i in 0..1_000_000 {
            addr.send(Put(vm_record(i)))
                .await
                .expect("mailbox")
                .expect("put");
            writeln!(stdout, "ack {i}").expect("write ack");
            stdout.flush().expect("flush ack");
        }
    });
}

#[test]
fn every_acknowledged_write_survives_sigkill() {
    const KILL_AFTER: usize = 300;
    let tmp = state_dir();
    let mut child = spawn_child("acknowledging_writer_child", tmp.path());
    let stdout = child.stdout.take().expect("stdout");
    let mut acked = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    while acked.len() < KILL_AFTER {
        let line = lines.next().expect("child output").expect("read line");
        if let Some(i) = line.strip_prefix("ack ") {
            acked.push(i.parse::<usize>().expect("ack number"));
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL");
    // Acks already written before the kill count too.
    for line in lines {
        if let Some(i) = line.ok().as_deref().and_then(|l| l.strip_prefix("ack ")) {
            acked.push(i.parse::<usize>().expect("ack number"));
        }
    }
    child.wait().expect("reap child");

    let opened = store::open(tmp.path(), Schema::production()).expect("reopen after SIGKILL");
    for i in &acked {
        let key = format!("vm-{i}");
        let found: Option<VmRecord> = opened.store.get(&key).expect("get");
        assert!(found.is_some(), "acknowledged record {key} was lost");
    }
    eprintln!(
        "{} acknowledged records all found after SIGKILL",
        acked.len()
    );
}
