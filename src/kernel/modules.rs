//! Kernel modules a VM needs, in the order they load: each module's
//! `.modinfo` section names its dependencies (`depends=`); a package ships
//! no `modules.dep` (depmod runs at install), so the order is worked out
//! here. Modules the kernel has built in are skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use banger_agent::init::module_name;
use object::{Object, ObjectSection};

use super::{Capped, KernelError, UnpackLimit};

/// What a module's `.modinfo` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The module's name, `_` for `-` as the kernel spells it.
    pub name: String,
    pub depends: Vec<String>,
}

/// The kernel's own spelling of a module name.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The `.ko` inside a possibly compressed module file.
pub fn decompress(path: &str, bytes: Vec<u8>, limit: UnpackLimit) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    let failed = |e: std::io::Error| KernelError::Module {
        module: path.to_string(),
        reason: format!("cannot decompress: {e}"),
    };
    if path.ends_with(".xz") {
        Capped::new(liblzma::read::XzDecoder::new(&bytes[..]), limit)
            .read_to_end(&mut out)
            .map_err(failed)?;
    } else if path.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&bytes[..])
            .and_then(|d| Capped::new(d, limit).read_to_end(&mut out))
            .map_err(failed)?;
    } else if path.ends_with(".gz") {
        Capped::new(flate2::read::GzDecoder::new(&bytes[..]), limit)
            .read_to_end(&mut out)
            .map_err(failed)?;
    } else {
        return Ok(bytes);
    }
    Ok(out)
}

/// Reads a `.ko`'s name and dependencies from its `.modinfo` section.
pub fn parse(path: &str, ko: &[u8]) -> Result<Module, KernelError> {
    let bad = |reason: String| KernelError::Module {
        module: path.to_string(),
        reason,
    };
    let elf = object::File::parse(ko).map_err(|e| bad(format!("not an ELF object: {e}")))?;
    let info = elf
        .section_by_name(".modinfo")
        .ok_or_else(|| bad("no .modinfo section".into()))?
        .data()
        .map_err(|e| bad(format!("unreadable .modinfo: {e}")))?;
    let mut name = None;
    let mut depends = Vec::new();
    for field in info.split(|b| *b == 0) {
        let field = String::from_utf8_lossy(field);
        if let Some(value) = field.strip_prefix("name=") {
            name = Some(canonical(value));
        } else if let Some(value) = field.strip_prefix("depends=") {
            depends = value
                .split(',')
                .filter(|d| !d.is_empty())
                .map(canonical)
                .collect();
        }
    }
    let name = name
        .or_else(|| module_name(path))
        .ok_or_else(|| bad("no module name".into()))?;
    Ok(Module { name, depends })
}

/// Module names a `modules.builtin` lists (`kernel/fs/ext4/ext4.ko`).
pub fn builtin(text: &str) -> HashSet<String> {
    text.lines().filter_map(module_name).collect()
}

/// Dependency chains deeper than this are refused: a real kernel's are a
/// few modules deep, and a package chooses the depth.
pub const MAX_DEPENDENCY_DEPTH: usize = 64;

/// The modules to load for `wanted`, dependencies first. A wanted module
/// the kernel has built in is skipped; one neither built in nor shipped
/// is an error, as is a dependency cycle or a chain deeper than
/// [`MAX_DEPENDENCY_DEPTH`]. Depth-first on a stack of its own, not by
/// recursion.
pub fn load_order(
    wanted: &[&str],
    available: &HashMap<String, Module>,
    builtin: &HashSet<String>,
) -> Result<Vec<String>, KernelError> {
    let mut walk = Walk {
        available,
        builtin,
        marks: BTreeMap::new(),
        stack: Vec::new(),
    };
    let mut order = Vec::new();
    for name in wanted {
        walk.enter(&canonical(name))?;
        // The top module's next dependency, until it has none left.
        while let Some((name, next)) = walk.stack.last_mut() {
            let dependency = available
                .get(name.as_str())
                .and_then(|m| m.depends.get(*next))
                .cloned();
            *next += 1;
            match dependency {
                Some(dependency) => walk.enter(&dependency)?,
                None => {
                    if let Some((name, _)) = walk.stack.pop() {
                        walk.marks.insert(name.clone(), Mark::Done);
                        order.push(name);
                    }
                }
            }
        }
    }
    Ok(order)
}

#[derive(Clone, Copy, PartialEq)]
enum Mark {
    Visiting,
    Done,
}

/// A depth-first walk of module dependencies: the modules being visited,
/// each with the index of its next dependency.
struct Walk<'a> {
    available: &'a HashMap<String, Module>,
    builtin: &'a HashSet<String>,
    marks: BTreeMap<String, Mark>,
    stack: Vec<(String, usize)>,
}

impl Walk<'_> {
    /// Starts visiting `name`, unless it is done or built in.
    fn enter(&mut self, name: &str) -> Result<(), KernelError> {
        let refuse = |reason: String| KernelError::Module {
            module: name.to_string(),
            reason,
        };
        match self.marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                return Err(refuse("depends on itself through its dependencies".into()));
            }
            None => {}
        }
        if !self.available.contains_key(name) {
            if self.builtin.contains(name) {
                self.marks.insert(name.to_string(), Mark::Done);
                return Ok(());
            }
            return Err(refuse(
                "neither built into the kernel nor in the package".into(),
            ));
        }
        if self.stack.len() >= MAX_DEPENDENCY_DEPTH {
            return Err(refuse(format!(
                "its dependencies chain more than {MAX_DEPENDENCY_DEPTH} modules deep"
            )));
        }
        self.marks.insert(name.to_string(), Mark::Visiting);
        self.stack.push((name.to_string(), 0));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal relocatable ELF64 whose only content is a `.modinfo`
    /// section, as the kernel's modpost writes it.
    pub(crate) fn ko(name: &str, depends: &[&str]) -> Vec<u8> {
        let modinfo = format!(
            "license=GPL\0depends={}\0retpoline=Y\0name={name}\0vermagic=6.1.0 SMP\0",
            depends.join(",")
        );
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_at = 64u64;
        let shstrtab_at = modinfo_at + modinfo.len() as u64;
        let headers_at = (shstrtab_at + shstrtab.len() as u64).next_multiple_of(8);
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(16, 0);
        for half in [1u16, 62] {
            elf.extend(half.to_le_bytes()); // ET_REL, x86-64
        }
        elf.extend(1u32.to_le_bytes());
        elf.extend([0u64, 0, headers_at].iter().flat_map(|v| v.to_le_bytes()));
        elf.extend(0u32.to_le_bytes());
        for half in [64u16, 0, 0, 64, 3, 2] {
            elf.extend(half.to_le_bytes());
        }
        elf.extend(modinfo.as_bytes());
        elf.extend(shstrtab);
        elf.resize(headers_at as usize, 0);
        let section = |name: u32, kind: u32, at: u64, size: usize| {
            let mut header = Vec::new();
            header.extend(name.to_le_bytes());
            header.extend(kind.to_le_bytes());
            header.extend(
                [0u64, 0, at, size as u64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            );
            header.extend([0u32, 0].iter().flat_map(|v| v.to_le_bytes()));
            header.extend([1u64, 0].iter().flat_map(|v| v.to_le_bytes()));
            header
        };
        elf.extend(vec![0u8; 64]);
        elf.extend(section(1, 1, modinfo_at, modinfo.len())); // PROGBITS
        elf.extend(section(10, 3, shstrtab_at, shstrtab.len())); // STRTAB
        elf
    }

    #[test]
    fn modinfo_gives_the_name_and_dependencies() {
        let parsed = parse(
            "x/virtio_net.ko",
            &ko("virtio_net", &["net_failover", "virtio-ring"]),
        )
        .expect("parse");
        assert_eq!(parsed.name, "virtio_net");
        assert_eq!(parsed.depends, ["net_failover", "virtio_ring"]);
        let alone = parse("x/failover.ko", &ko("failover", &[])).expect("parse");
        assert!(alone.depends.is_empty());
        let error = parse("x/bad.ko", b"\x7fELF garbage").expect_err("not elf");
        assert!(
            error.to_string().starts_with("module x/bad.ko: "),
            "{error}"
        );
    }

    fn module(name: &str, depends: &[&str]) -> (String, Module) {
        (
            name.to_string(),
            Module {
                name: name.to_string(),
                depends: depends.iter().map(|d| d.to_string()).collect(),
            },
        )
    }

    #[test]
    fn dependencies_load_first_and_builtins_are_skipped() {
        let available: HashMap<String, Module> = [
            module("virtio_net", &["net_failover", "virtio"]),
            module("net_failover", &["failover"]),
            module("failover", &[]),
            module("virtio_blk", &["virtio", "virtio_ring"]),
            module("virtio_ring", &[]),
        ]
        .into_iter()
        .collect();
        let builtin: HashSet<String> = ["virtio".to_string()].into_iter().collect();
        let order = load_order(
            &["virtio_blk", "virtio-net", "virtio"],
            &available,
            &builtin,
        )
        .expect("order");
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn a_missing_module_or_a_cycle_is_named() {
        let available: HashMap<String, Module> = [
            module("a", &["b"]),
            module("b", &["a"]),
            module("c", &["gone"]),
        ]
        .into_iter()
        .collect();
        let cycle = load_order(&["a"], &available, &HashSet::new()).expect_err("cycle");
        assert!(cycle.to_string().contains("depends on itself"), "{cycle}");
        let missing = load_order(&["c"], &available, &HashSet::new()).expect_err("missing");
        assert!(missing.to_string().contains("module gone"), "{missing}");
    }

    #[test]
    fn a_chain_deeper_than_the_bound_is_refused_without_recursion() {
        let depth = 100_000;
        let available: HashMap<String, Module> = (0..depth)
            .map(|i| {
                let next = format!("m{}", i + 1);
                let depends: &[&str] = if i + 1 < depth { &[next.as_str()] } else { &[] };
                module(&format!("m{i}"), depends)
            })
            .collect();
        let refused = load_order(&["m0"], &available, &HashSet::new()).expect_err("too deep");
        assert!(refused.to_string().contains("modules deep"), "{refused}");
        let shallow = load_order(&["m99960"], &available, &HashSet::new()).expect("40 deep");
        assert_eq!(shallow.len(), 40);
        assert_eq!(shallow.first().map(String::as_str), Some("m99999"));
    }

    #[test]
    fn names_come_from_paths_and_builtin_lists() {
        assert_eq!(
            module_name("lib/modules/6.1/kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            Some("virtio_rng".into())
        );
        assert_eq!(
            module_name("kernel/net/vmw_vsock/vsock.ko"),
            Some("vsock".into())
        );
        assert_eq!(module_name("kernel/README"), None);
        let builtin = builtin("kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio.ko\n");
        assert!(builtin.contains("ext4") && builtin.contains("virtio"));
    }
}
