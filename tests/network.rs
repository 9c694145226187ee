//! Networks end to end, with real bridges, taps, nftables rules and QEMU
//! guests. The whole network world lives in namespaces the test makes: the
//! daemon's, joined by a veth pair to a second one that stands in for the
//! outside (a listener there). Nothing is sent anywhere else, and the
//! namespaces, processes and files go when the test ends, also on failure.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

use common::guest::{Fixture, guest_fixtures, import_kernel};
use common::{EVENT_TIMEOUT, skip};
use serde_json::Value;

/// The outside's address, across the veth pair from the daemon's namespace.
const OUTSIDE: &str = "198.18.0.2";
const OUTSIDE_PORT: &str = "7000";
const HOST_PORT: &str = "7001";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and the veth between them; removed on drop.
struct World {
    daemon: String,
    outside: String,
    listeners: Vec<Child>,
}

impl World {
    fn new(tag: &str) -> World {
        let id = std::process::id();
        let world = World {
            daemon: format!("bgtn{tag}{id}"),
            outside: format!("bgto{tag}{id}"),
            listeners: Vec::new(),
        };
        for ns in [&world.daemon, &world.outside] {
            let _ = ip(&["netns", "del", ns]);
            ip_ok(&["netns", "add", ns]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (d, o) = (world.daemon.as_str(), world.outside.as_str());
        ip_ok(&[
            "-n", d, "link", "add", "vout", "type", "veth", "peer", "name", "vin", "netns", o,
        ]);
        ip_ok(&["-n", d, "addr", "add", "198.18.0.1/30", "dev", "vout"]);
        ip_ok(&[
            "-n",
            o,
            "addr",
            "add",
            &format!("{OUTSIDE}/30"),
            "dev",
            "vin",
        ]);
        ip_ok(&["-n", d, "link", "set", "vout", "up"]);
        ip_ok(&["-n", o, "link", "set", "vin", "up"]);
        ip_ok(&["-n", d, "route", "add", "default", "via", OUTSIDE]);
        world
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.daemon))
    }

    /// A TCP listener in namespace `ns` that answers `hello` and reports
    /// each peer's address.
    fn listen(&mut self, ns: &str, address: &str, port: &str) -> mpsc::Receiver<String> {
        let script = "import socket,sys\n\
            s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
            s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16); print('listening', flush=True)\n\
            while True:\n    c,a=s.accept(); print(a[0], flush=True); c.sendall(b'hello\\n'); c.close()\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script, address, port])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the listener");
        let stdout = child.stdout.take().expect("stdout");
        self.listeners.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        assert_eq!(
            rx.recv_timeout(EVENT_TIMEOUT).expect("the listener starts"),
            "listening"
        );
        rx
    }

    /// The daemon namespace's links and rules, as a before/after witness.
    fn host_state(&self) -> String {
        let links = ip(&["-n", &self.daemon, "-j", "link"]);
        let rules = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.daemon,
                "nft",
                "-j",
                "list",
                "ruleset",
            ])
            .output()
            .expect("nft");
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&links.stdout),
            String::from_utf8_lossy(&rules.stdout)
        )
    }

    /// Waits (with a deadline) for the link `name` to go.
    fn wait_gone(&self, name: &str, why: &str) {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while self.links().contains(name) {
            assert!(std::time::Instant::now() < deadline, "{why}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn links(&self) -> String {
        String::from_utf8_lossy(&ip(&["-n", &self.daemon, "-d", "link"]).stdout).into_owned()
    }

    fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.daemon, "nft"])
            .args(args)
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for listener in &mut self.listeners {
            let _ = listener.kill();
            let _ = listener.wait();
        }
        for ns in [&self.daemon, &self.outside] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn network_prerequisites(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        skip(test, "network namespaces need root");
        return false;
    }
    common::tools_installed(test, &["nft", "python3", "nsenter"])
}

fn exec(f: &Fixture, vm: &str, script: &str) -> Output {
    f.run(&["vm", "exec", vm, "--", "sh", "-c", script])
}

fn exec_ok(f: &Fixture, vm: &str, script: &str) -> String {
    let out = exec(f, vm, script);
    assert!(
        out.status.success(),
        "{vm}: {script}: {:?} {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inspect(f: &Fixture, vm: &str) -> Value {
    f.json(&["vm", "inspect", vm, "--json"])
}

fn start_vm(f: &Fixture, name: &str, kernel: &str, network: &[&str]) -> Value {
    let rootfs = f.rootfs.to_str().expect("utf-8");
    let mut args = vec![
        "vm", "create", name, "--kernel", kernel, "--rootfs", rootfs, "--vmm", "qemu", "--start",
        "--json",
    ];
    args.extend(network);
    let vm = f.json(&args);
    // The agent answers once the guest has configured its network.
    f.ok(&["vm", "ping", name]);
    vm
}

fn reaches(f: &Fixture, vm: &str, address: &str) -> bool {
    exec(f, vm, &format!("ping -c 1 -W 2 {address}"))
        .status
        .success()
}

#[test]
fn guests_reach_each_other_and_the_outside_and_nothing_else() {
    let test = "guests_reach_each_other_and_the_outside_and_nothing_else";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    if !network_prerequisites(test) {
        return;
    }
    let mut world = World::new("a");
    let outside = world.listen(&world.outside.clone(), OUTSIDE, OUTSIDE_PORT);
    let host = world.listen(&world.daemon.clone(), "0.0.0.0", HOST_PORT);
    let f = Fixture::in_netns(&guest, world.path());
    import_kernel(&f, &guest.kernel_deb);
    let kernel = "debian";

    let a = start_vm(&f, "a", kernel, &[]);
    let b = start_vm(&f, "b", kernel, &[]);
    let (ip_a, ip_b) = (
        a["ip"].as_str().expect("a's ip"),
        b["ip"].as_str().expect("b's ip"),
    );
    assert_eq!(a["network"], "default");
    assert_eq!(ip_a, "172.30.0.2");
    assert_eq!(ip_b, "172.30.0.3");
    let mac = a["mac"].as_str().expect("a's mac");
    assert!(mac.starts_with("02:"), "{mac}");
    let shown = exec_ok(&f, "a", "ip addr show eth0; cat /etc/resolv.conf");
    assert!(shown.contains(&format!("inet {ip_a}/24")), "{shown}");
    assert!(shown.contains(mac), "{shown}");
    assert!(shown.contains("mtu 1500"), "{shown}");
    let default = f.json(&["network", "inspect", "default", "--json"]);
    if let Some(dns) = default["dns"].as_str() {
        assert!(shown.contains(&format!("nameserver {dns}")), "{shown}");
    }
    assert_eq!(
        default["leases"].as_array().map(Vec::len),
        Some(2),
        "{default}"
    );

    // Each other, by IP.
    assert!(reaches(&f, "a", ip_b), "a cannot reach b");
    assert!(reaches(&f, "b", ip_a), "b cannot reach a");
    // The outside, through NAT: the listener sees the daemon's address.
    let hello = exec_ok(
        &f,
        "a",
        &format!("nc -w 5 {OUTSIDE} {OUTSIDE_PORT} </dev/null"),
    );
    assert_eq!(hello.trim(), "hello");
    assert_eq!(
        outside.recv_timeout(EVENT_TIMEOUT).expect("a connection"),
        "198.18.0.1"
    );
    // Not a host service listening on every address.
    let refused = exec(
        &f,
        "a",
        &format!("nc -w 2 172.30.0.1 {HOST_PORT} </dev/null"),
    );
    assert!(
        String::from_utf8_lossy(&refused.stdout).trim().is_empty(),
        "a guest reached a host service"
    );
    assert!(host.try_recv().is_err(), "the host service saw a guest");

    // A second network: no way across.
    f.ok(&["network", "create", "lab", "--subnet", "10.77.0.0/24"]);
    let c = start_vm(&f, "c", kernel, &["--network", "lab"]);
    assert_eq!(c["ip"], "10.77.0.2");
    assert!(
        !reaches(&f, "c", ip_a),
        "c crossed into the default network"
    );
    assert!(!reaches(&f, "a", "10.77.0.2"), "a crossed into lab");
    let refused = f.run(&["network", "rm", "lab"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("used by VM c"), "{message}");
    let listed = f.json(&["network", "ls", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");

    // A guest that takes another address reaches nothing.
    exec_ok(
        &f,
        "a",
        "ip addr flush dev eth0 && ip addr add 172.30.0.77/24 dev eth0 && ip route add default via 172.30.0.1",
    );
    assert!(!reaches(&f, "a", ip_b), "a spoofed address reached b");
    let spoofed = exec(
        &f,
        "a",
        &format!("nc -w 2 {OUTSIDE} {OUTSIDE_PORT} </dev/null"),
    );
    assert!(
        String::from_utf8_lossy(&spoofed.stdout).trim().is_empty(),
        "a spoofed address reached the outside"
    );
    assert!(
        outside.try_recv().is_err(),
        "the outside saw a spoofed guest"
    );

    // Removed VMs give back taps and elements; an unused network goes.
    for vm in ["a", "b", "c"] {
        f.ok(&["vm", "rm", "--force", vm]);
    }
    f.ok(&["network", "rm", "lab"]);
    let links = world.links();
    assert!(!links.contains(" bt"), "taps left: {links}");
    let guests = world.nft(&["list", "set", "bridge", "banger", "guests"]);
    assert!(!guests.contains("elements"), "{guests}");
}

#[test]
fn a_killed_daemon_and_vmm_keep_address_mac_and_tap_and_strays_go() {
    let test = "a_killed_daemon_and_vmm_keep_address_mac_and_tap_and_strays_go";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    if !network_prerequisites(test) {
        return;
    }
    let world = World::new("k");
    let mut f = Fixture::in_netns(&guest, world.path());
    import_kernel(&f, &guest.kernel_deb);
    let kernel = "debian";
    let before = start_vm(&f, "guest", kernel, &[]);
    let tap = format!("bt{}", before["id"].as_str().expect("id"));
    assert!(world.links().contains(&tap), "{}", world.links());

    // SIGKILL both, then leave strays behind: a tap in banger's group, a
    // tap of banger's name outside it, and an element no record claims.
    let pid = before["pid"].as_i64().expect("pid") as i32;
    drop(f.daemon.take());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let d = world.daemon.as_str();
    for stray in ["btstray00001", "btforeign001"] {
        ip_ok(&["-n", d, "tuntap", "add", "dev", stray, "mode", "tap"]);
    }
    ip_ok(&["-n", d, "link", "set", "btstray00001", "group", "2894"]);
    let added = Command::new("ip")
        .args([
            "netns", "exec", d, "nft", "add", "element", "bridge", "banger", "guests",
        ])
        .arg("{ \"btstray00001\" . 02:00:00:00:00:09 . 172.30.0.99 }")
        .status()
        .expect("nft");
    assert!(added.success());

    f.start_daemon();
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    let after = loop {
        let vm = inspect(&f, "guest");
        if vm["state"] == "running" && vm["pid"].as_i64() != Some(pid.into()) {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never restarted: {vm}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    f.ok(&["vm", "ping", "guest"]);
    assert_eq!(after["ip"], before["ip"]);
    assert_eq!(after["mac"], before["mac"]);
    let links = world.links();
    assert!(links.contains(&tap), "{links}");
    assert!(
        !links.contains("btstray00001"),
        "a stray tap stayed: {links}"
    );
    assert!(
        links.contains("btforeign001"),
        "a tap outside banger's group went: {links}"
    );
    let guests = world.nft(&["list", "set", "bridge", "banger", "guests"]);
    assert!(!guests.contains("172.30.0.99"), "{guests}");
    assert!(
        guests.contains(before["ip"].as_str().expect("ip")),
        "{guests}"
    );
    let shown = exec_ok(&f, "guest", "ip addr show eth0");
    assert!(
        shown.contains(before["ip"].as_str().expect("ip")),
        "{shown}"
    );
    f.ok(&["vm", "rm", "--force", "guest"]);
}

/// A halt-kernel daemon (no guest boots) in a namespace of its own.
fn bad_input_fixture(test: &str) -> Option<(common::halt::Fixture, World)> {
    if !network_prerequisites(test) {
        return None;
    }
    let world = World::new("b");
    let mut f = common::halt::Fixture::new(test)?;
    f.netns = Some(world.path());
    f.start_daemon();
    Some((f, world))
}

#[test]
fn bad_network_input_is_refused_naming_the_field_and_changes_nothing() {
    let test = "bad_network_input_is_refused_naming_the_field_and_changes_nothing";
    let Some((f, world)) = bad_input_fixture(test) else {
        return;
    };
    // A host address the subnet must not overlap.
    ip_ok(&[
        "-n",
        &world.daemon,
        "addr",
        "add",
        "203.0.113.1/24",
        "dev",
        "lo",
    ]);
    let refused = |args: &[&str], needles: &[&str]| {
        let before = world.host_state();
        let out = f.run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let message = String::from_utf8_lossy(&out.stderr);
        for needle in needles {
            assert!(message.contains(needle), "{args:?}: {message}");
        }
        assert_eq!(before, world.host_state(), "{args:?} changed the host");
    };
    let create = |name: &'static str, subnet: &'static str| {
        vec!["network", "create", name, "--subnet", subnet]
    };
    refused(
        &create("over", "172.30.0.0/16"),
        &["subnet", "network default"],
    );
    refused(
        &create("clash", "203.0.113.0/25"),
        &["subnet", "203.0.113.0/24 on lo"],
    );
    refused(
        &create("host", "198.18.0.0/24"),
        &["subnet", "198.18.0.0/30 on vout"],
    );
    refused(&create("tiny", "10.1.0.0/31"), &["subnet", "/30"]);
    refused(&create("bad", "10.1.0.0/33"), &["subnet"]);
    refused(&create("bad", "banana"), &["subnet"]);
    refused(&create("bad", "10.1.0.1/24"), &["subnet", "10.1.0.0/24"]);
    refused(&create("Bad_Name", "10.1.0.0/24"), &["name"]);

    // Without --subnet: the first /24 free of the host and the others.
    let auto = f.json(&["network", "create", "auto", "--json"]);
    assert_eq!(auto["subnet"], "172.31.0.0/24", "{auto}");
    f.ok(&["network", "rm", "auto"]);

    // An exhausted pool: a /30 holds one VM.
    f.ok(&["network", "create", "one", "--subnet", "10.66.0.0/30"]);
    let rootfs = f.rootfs.to_str().expect("utf-8");
    f.ok(&[
        "vm",
        "create",
        "x",
        "--kernel",
        "halt",
        "--rootfs",
        rootfs,
        "--network",
        "one",
    ]);
    refused(
        &[
            "vm",
            "create",
            "y",
            "--kernel",
            "halt",
            "--rootfs",
            rootfs,
            "--network",
            "one",
        ],
        &["network one has no free address", "1 of 1"],
    );
    let vms = f.json(&["vm", "ls", "--json"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
    refused(
        &[
            "vm",
            "create",
            "z",
            "--kernel",
            "halt",
            "--rootfs",
            rootfs,
            "--network",
            "nope",
        ],
        &["no network named nope"],
    );
    f.ok(&["vm", "rm", "x"]);
    let network = f.json(&["network", "inspect", "one", "--json"]);
    assert_eq!(
        network["leases"].as_array().map(Vec::len),
        Some(0),
        "{network}"
    );
}

#[test]
fn without_cap_net_admin_vms_have_no_network_and_say_why() {
    let test = "without_cap_net_admin_vms_have_no_network_and_say_why";
    if !network_prerequisites(test) {
        return;
    }
    let Some(mut f) = common::halt::Fixture::new(test) else {
        return;
    };
    f.start_daemon_through(&["setpriv", "--bounding-set", "-net_admin"]);
    f.daemon()
        .wait_for_line_from(&["networking is off", "CAP_NET_ADMIN"], 0)
        .expect("the daemon says networking is off");
    let rootfs = f.rootfs.to_str().expect("utf-8");
    let vm = f.json(&[
        "vm", "create", "plain", "--kernel", "halt", "--rootfs", rootfs, "--json",
    ]);
    assert_eq!(vm["network"], Value::Null);
    let out = f.run(&[
        "vm",
        "create",
        "n",
        "--kernel",
        "halt",
        "--rootfs",
        rootfs,
        "--network",
        "default",
    ]);
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("CAP_NET_ADMIN"), "{message}");
}

#[test]
fn a_jailed_firecracker_vm_gets_its_tap_and_mac_through_the_api() {
    let test = "a_jailed_firecracker_vm_gets_its_tap_and_mac_through_the_api";
    if !network_prerequisites(test) {
        return;
    }
    let world = World::new("f");
    let Some(mut f) = common::halt::Fixture::with_jailer(test, true) else {
        return;
    };
    f.netns = Some(world.path());
    f.start_daemon();
    let vm = f.create("jailed", &["--start"]);
    let id = vm["id"].as_str().expect("id");
    let tap = format!("bt{id}");
    let socket = f
        .state()
        .join("jail/firecracker")
        .join(id)
        .join("root/run/firecracker.socket");
    let config: Value = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(banger::vmm::firecracker::ApiClient::new(&socket).get("/vm/config"))
        .expect("the VMM's API answers");
    let nic = &config["network-interfaces"][0];
    assert_eq!(nic["host_dev_name"], tap.as_str(), "{config}");
    assert_eq!(nic["guest_mac"], vm["mac"], "{config}");
    let boot_args = config["boot-source"]["boot_args"]
        .as_str()
        .unwrap_or_default();
    assert!(
        boot_args.contains(&format!("banger.ip={}/24", vm["ip"].as_str().expect("ip"))),
        "{boot_args}"
    );
    assert!(
        !boot_args.contains(" ip="),
        "no kernel autoconfiguration: {boot_args}"
    );
    // The jailer's uid owns the tap, so the jailed VMM opens it unprivileged.
    let owner = Command::new("ip")
        .args(["netns", "exec", &world.daemon, "cat"])
        .arg(format!("/sys/class/net/{tap}/owner"))
        .output()
        .expect("read the tap's owner");
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout).trim(),
        "65534",
        "the tap's owner"
    );
    // A VM that stops for good gives its tap back (after the stop is
    // recorded and answered).
    f.ok(&["vm", "stop", "jailed", "--timeout", "0.2"]);
    world.wait_gone(&tap, "a stopped VM kept its tap");
    f.ok(&["vm", "rm", "jailed"]);
}

#[test]
fn host_access_opens_host_services_to_that_network_only() {
    let test = "host_access_opens_host_services_to_that_network_only";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    if !network_prerequisites(test) {
        return;
    }
    let mut world = World::new("h");
    let host = world.listen(&world.daemon.clone(), "0.0.0.0", HOST_PORT);
    let f = Fixture::in_netns(&guest, world.path());
    import_kernel(&f, &guest.kernel_deb);
    f.ok(&[
        "network",
        "create",
        "open",
        "--subnet",
        "10.78.0.0/24",
        "--host-access",
    ]);
    start_vm(&f, "guest", "debian", &["--network", "open"]);
    let hello = exec_ok(
        &f,
        "guest",
        &format!("nc -w 5 10.78.0.1 {HOST_PORT} </dev/null"),
    );
    assert_eq!(hello.trim(), "hello");
    assert_eq!(
        host.recv_timeout(EVENT_TIMEOUT).expect("a connection"),
        "10.78.0.2"
    );
    f.ok(&["vm", "rm", "--force", "guest"]);
}

#[test]
fn a_configured_default_subnet_that_clashes_is_refused_naming_the_route() {
    let test = "a_configured_default_subnet_that_clashes_is_refused_naming_the_route";
    if !network_prerequisites(test) {
        return;
    }
    let world = World::new("c");
    let tmp = common::state_dir();
    let config = tmp.path().join("bangerd.toml");
    std::fs::write(&config, "[network]\ndefault_subnet = \"198.18.0.0/24\"\n").expect("config");
    let state = tmp.path().join("state");
    let daemon = common::Daemon::spawn_in(
        Some(&world.path()),
        std::path::Path::new(common::BANGERD),
        &state,
        &["--user", "--config", config.to_str().expect("utf-8")],
        &[],
    );
    let (status, stderr) = daemon.wait_output();
    assert!(!status.success(), "the daemon started: {stderr}");
    assert!(
        stderr.contains("198.18.0.0/24") && stderr.contains("198.18.0.0/30 on vout"),
        "{stderr}"
    );
    assert!(!world.links().contains("banger0"), "{}", world.links());
}

#[test]
fn a_foreign_forward_chain_that_drops_does_not_break_nat() {
    let test = "a_foreign_forward_chain_that_drops_does_not_break_nat";
    let Some(guest) = guest_fixtures(test) else {
        return;
    };
    if !network_prerequisites(test) {
        return;
    }
    let mut world = World::new("d");
    // What Docker leaves on a host: iptables-nft's FORWARD chain, policy
    // drop, jumping to DOCKER-USER; Docker then manages it with iptables.
    let iptables = |world: &World, program: &str, args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &world.daemon, program])
            .args(args)
            .output()
            .expect("iptables-nft");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    iptables(&world, "iptables-nft", &["-P", "FORWARD", "DROP"]);
    iptables(&world, "iptables-nft", &["-N", "DOCKER-USER"]);
    iptables(
        &world,
        "iptables-nft",
        &["-A", "FORWARD", "-j", "DOCKER-USER"],
    );
    let made = iptables(&world, "iptables-nft", &["-S", "FORWARD"]);
    let outside = world.listen(&world.outside.clone(), OUTSIDE, OUTSIDE_PORT);
    let f = Fixture::in_netns(&guest, world.path());
    import_kernel(&f, &guest.kernel_deb);
    start_vm(&f, "guest", "debian", &[]);
    let hello = exec_ok(
        &f,
        "guest",
        &format!("nc -w 5 {OUTSIDE} {OUTSIDE_PORT} </dev/null"),
    );
    assert_eq!(hello.trim(), "hello");
    assert_eq!(
        outside.recv_timeout(EVENT_TIMEOUT).expect("a connection"),
        "198.18.0.1"
    );
    // Banger's accepts there are two per NAT network, however often it
    // reconciles, and name its bridges only.
    // Written so that iptables-nft (and Docker through it) still lists
    // and saves the chain.
    f.ok(&["network", "reconcile"]);
    f.ok(&["network", "create", "lab", "--subnet", "10.79.0.0/24"]);
    let chain = iptables(&world, "iptables-nft", &["-S", "FORWARD"]);
    assert_eq!(chain.matches("--comment banger").count(), 4, "{chain}");
    assert!(
        chain.contains("-A FORWARD -i banger0 -m comment --comment banger -j ACCEPT"),
        "{chain}"
    );
    assert!(
        chain.contains("-o banger0 -m conntrack --ctstate RELATED,ESTABLISHED"),
        "{chain}"
    );
    let saved = iptables(&world, "iptables-nft-save", &[]);
    assert!(!saved.contains("incompatible"), "{saved}");
    assert_eq!(saved.matches("--comment banger").count(), 4, "{saved}");
    f.ok(&["vm", "rm", "--force", "guest"]);
    f.ok(&["network", "rm", "lab"]);
    // Back to the test's chain and the default network's two accepts.
    let chain = iptables(&world, "iptables-nft", &["-S", "FORWARD"]);
    let theirs: Vec<&str> = chain
        .lines()
        .filter(|l| !l.contains("--comment banger"))
        .collect();
    assert_eq!(theirs, made.lines().collect::<Vec<_>>(), "{chain}");
    assert_eq!(chain.matches("--comment banger").count(), 2, "{chain}");
}

#[test]
fn a_daemon_killed_around_attach_or_detach_leaves_no_tap_behind() {
    let test = "a_daemon_killed_around_attach_or_detach_leaves_no_tap_behind";
    if !network_prerequisites(test) {
        return;
    }
    let world = World::new("x");
    let Some(mut f) = common::halt::Fixture::new(test) else {
        return;
    };
    f.netns = Some(world.path());
    f.start_daemon();
    let vm = f.create("web", &[]);
    let tap = format!("bt{}", vm["id"].as_str().expect("id"));
    let address = vm["ip"].as_str().expect("ip").to_string();

    // Killed with the tap made and no VMM yet: the next daemon keeps the
    // tap its ledger names and launches again.
    common::halt::kill_daemon_during(&mut f, "attached:1", |f| {
        drop(f.run(&["vm", "start", "web"]));
    });
    f.wait_for("web", "running", |v| v["state"] == "running");
    assert_eq!(world.links().matches(&tap).count(), 1, "{}", world.links());
    let guests = world.nft(&["list", "set", "bridge", "banger", "guests"]);
    assert!(guests.contains(&address), "{guests}");

    // Killed with the stop recorded and the tap not yet removed: the next
    // daemon removes it.
    common::halt::kill_daemon_during(&mut f, "detach:1", |f| {
        drop(f.run(&["vm", "stop", "web", "--timeout", "0.2"]));
    });
    world.wait_gone(&tap, "the tap outlived its VM's stop");
    assert_eq!(f.vm("web")["state"], "stopped");
    let guests = world.nft(&["list", "set", "bridge", "banger", "guests"]);
    assert!(!guests.contains(&address), "{guests}");
    f.ok(&["vm", "rm", "web"]);
    let network = f.json(&["network", "inspect", "default", "--json"]);
    assert_eq!(
        network["leases"].as_array().map(Vec::len),
        Some(0),
        "{network}"
    );
}

/// The daemon namespace's IPv4 forwarding, as its sysctl says.
fn forwarding(world: &World) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.daemon,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ])
        .output()
        .expect("read ip_forward");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ipv4_forwarding_is_given_back_when_banger_s_last_nat_network_goes() {
    let test = "ipv4_forwarding_is_given_back_when_banger_s_last_nat_network_goes";
    let Some((mut f, world)) = bad_input_fixture(test) else {
        return;
    };
    let marker = f.state().join("ipv4-forwarding.banger");
    // Off before: the default network turned it on, and said so first.
    assert_eq!(forwarding(&world), "1");
    assert!(marker.exists(), "the record that banger turned it on");
    f.ok(&["network", "create", "extra", "--json"]);
    f.ok(&["network", "rm", "default"]);
    assert_eq!(forwarding(&world), "1", "a NAT network remains");
    let refused = f.run(&[
        "vm",
        "create",
        "nodefault",
        "--kernel",
        "halt",
        "--rootfs",
        f.rootfs.to_str().expect("utf-8"),
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("network create default"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    f.ok(&["network", "rm", "extra"]);
    assert_eq!(forwarding(&world), "0", "banger's last NAT network is gone");
    assert!(!marker.exists());

    // On before: the next start makes the default network again, and its
    // removal leaves forwarding as it found it.
    let on = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.daemon,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ])
        .status()
        .expect("turn forwarding on");
    assert!(on.success());
    f.start_daemon();
    assert!(f.ok(&["network", "ls"]).contains("default"));
    assert!(
        !marker.exists(),
        "it was on: nothing of banger's to give back"
    );
    f.ok(&["network", "rm", "default"]);
    assert_eq!(forwarding(&world), "1", "it was on before banger");
}
