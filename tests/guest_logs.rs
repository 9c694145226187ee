//! What a guest writes stays bounded and is read only as far as it is
//! shown: a guest writing its console as fast as it can keeps the file
//! within the cap (checked as it grows, not on a timer alone), and
//! `vm logs --tail` of a huge console reads its end only.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::EVENT_TIMEOUT;
use common::guest::{Fixture, guest_fixtures, import_kernel};

/// `vmm::logs::MAX_LOG_BYTES`.
const CAP: u64 = 4 << 20;

fn held(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[test]
fn a_guest_s_console_stays_capped_and_its_tail_is_read_from_the_end() {
    let test = "a_guest_s_console_stays_capped_and_its_tail_is_read_from_the_end";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    let f = Fixture::new(&guest);
    import_kernel(&f, &guest.kernel_deb);
    let rootfs = f.rootfs.to_str().expect("utf-8").to_string();
    let vm = f.json(&[
        "vm", "create", "guest", "--kernel", "debian", "--rootfs", &rootfs, "--vmm", "qemu",
        "--memory", "256M", "--start", "--json",
    ]);
    f.json(&["vm", "ping", "guest", "--wait", "60", "--json"]);
    let id = vm["id"].as_str().expect("id").to_string();
    let console: PathBuf = f.state().join("vms").join(&id).join("console.log");
    let rotated = console.with_file_name("console.log.1");

    // The guest writes its console flat out, three caps' worth.
    let writer = {
        let state = f.state();
        std::thread::spawn(move || {
            common::banger(
                &state,
                &[
                    "vm",
                    "exec",
                    "guest",
                    "--",
                    "sh",
                    "-c",
                    "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c 12582912 > /dev/ttyS0",
                ],
            )
        })
    };
    let deadline = Instant::now() + 4 * EVENT_TIMEOUT;
    let (mut peak, mut rotations, mut last_rotated) = (0, 0, None);
    while !writer.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the guest never finished writing"
        );
        peak = peak.max(held(&console));
        let now = std::fs::metadata(&rotated).and_then(|m| m.modified()).ok();
        if now.is_some() && now != last_rotated {
            rotations += 1;
            last_rotated = now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wrote = writer.join().expect("writer");
    assert!(
        wrote.status.success(),
        "{}",
        String::from_utf8_lossy(&wrote.stderr)
    );
    eprintln!("console peak {} KiB over {rotations} rotations", peak >> 10);
    assert!(
        rotations >= 1,
        "12 MiB written and the console never rotated"
    );
    assert!(peak <= CAP + (1 << 20), "the console held {peak} bytes");

    // A stopped VM's console of a gigabyte: its last ten lines are read,
    // nothing before them.
    f.ok(&["vm", "stop", "guest"]);
    {
        use std::io::Write;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&console)
            .expect("console");
        file.set_len(1 << 30).expect("a gigabyte");
        let mut file = std::io::BufWriter::new(file);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).expect("seek");
        for i in 0..1_000 {
            writeln!(file, "line {i}").expect("write");
        }
    }
    let daemon = f.daemon.as_ref().expect("daemon").pid().as_raw();
    let before = common::reset_peak_rss(daemon) >> 10;
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let tail = f.ok(&["vm", "logs", "guest", "--tail", "10"]);
        took.push(started.elapsed());
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 10, "{tail}");
        assert_eq!(lines.last(), Some(&"line 999"));
    }
    let after = common::process_kib(daemon, "VmHWM") >> 10;
    let fastest = took.iter().min().copied().unwrap_or_default();
    eprintln!("vm logs --tail 10 of a 1 GiB console: {took:?}; RSS {before} MiB, peak {after} MiB");
    assert!(fastest < Duration::from_millis(100), "{took:?}");
    assert!(after <= before + 16, "RSS {before} MiB, peak {after} MiB");
    f.ok(&["vm", "rm", "guest"]);
}
