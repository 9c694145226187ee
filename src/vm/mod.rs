//! The VM domain as plain data and functions: what a valid VM request is,
//! its identity (name and short id), its states, and its restart policy.
//! `actors::vm` applies them.

pub mod ledger;
pub mod machine;
pub mod phase;
pub mod record;
pub mod restart;
pub mod state;

use std::path::PathBuf;

/// Why a VM request is refused; each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidVm {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidVm {
    InvalidVm {
        field,
        reason: reason.into(),
    }
}

pub const MAX_VCPUS: u8 = 32;
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;

/// VM (and kernel) names: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), InvalidVm> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit"
            ),
        ))
    }
}

/// A fresh `adjective-noun` name.
pub fn generate_name() -> String {
    names::Generator::default()
        .next()
        .unwrap_or_else(|| format!("vm-{}", new_vm_id()))
}

/// A VM's short immutable id: 10 lowercase base32 characters of
/// randomness, safe in paths, socket names and interface names.
pub fn new_vm_id() -> String {
    let ulid = ulid::Ulid::new().to_string().to_ascii_lowercase();
    ulid[ulid.len() - 10..].to_string()
}

/// `--memory`: MiB as a plain integer, or a size with a suffix (`512M`,
/// `512MiB`, `2G`, `2GiB`).
pub fn parse_memory_mib(text: &str) -> Result<u32, InvalidVm> {
    let (number, suffix) = split_size(text).ok_or_else(|| {
        invalid(
            "memory",
            format!("{:?} is not a size like 512, 512M or 2G", text.trim()),
        )
    })?;
    let mib = match suffix.as_str() {
        "" | "m" | "mb" | "mib" => number,
        "g" | "gb" | "gib" => number.saturating_mul(1024),
        other => {
            return Err(invalid(
                "memory",
                format!("unknown unit {other:?}; use M or G"),
            ));
        }
    };
    validate_memory(mib)
}

/// A size's number and its unit, lowercased (`"2G"` is 2 and `"g"`).
fn split_size(text: &str) -> Option<(u64, String)> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    Some((digits.parse().ok()?, suffix.to_ascii_lowercase()))
}

/// `--disk`: a root disk's size, such as "1G" or "512M" (MiB when no unit
/// is given), in bytes.
pub fn parse_disk_bytes(text: &str) -> Result<u64, InvalidVm> {
    let text = text.trim();
    let (number, suffix) = split_size(text).filter(|&(n, _)| n > 0).ok_or_else(|| {
        invalid(
            "disk",
            format!("{text:?} is not a size like 512M, 4G or 1T"),
        )
    })?;
    let shift = match suffix.as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(invalid(
                "disk",
                format!("unknown unit {other:?}; use M, G or T"),
            ));
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| invalid("disk", format!("{text:?} is too large")))
}

fn validate_memory(mib: u64) -> Result<u32, InvalidVm> {
    match u32::try_from(mib) {
        Ok(mib) if (1..=MAX_MEMORY_MIB).contains(&mib) => Ok(mib),
        _ => Err(invalid(
            "memory",
            format!("{mib} MiB is outside 1 MiB to {MAX_MEMORY_MIB} MiB"),
        )),
    }
}

pub fn validate_vcpus(vcpus: u8) -> Result<u8, InvalidVm> {
    if (1..=MAX_VCPUS).contains(&vcpus) {
        Ok(vcpus)
    } else {
        Err(invalid(
            "vcpus",
            format!("{vcpus} is outside 1 to {MAX_VCPUS}"),
        ))
    }
}

/// A user-given root filesystem: an absolute path (it is opened, as the
/// caller, by `crate::caller`).
pub fn validate_rootfs(path: &std::path::Path) -> Result<PathBuf, InvalidVm> {
    if !path.is_absolute() {
        return Err(invalid(
            "rootfs",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_dns_label_rule() {
        for ok in ["a", "web-1", "0abc", &"a".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(64), "ü"] {
            let err = validate_name("name", bad).expect_err(bad);
            assert_eq!(err.field, "name");
        }
        assert!(validate_name("name", &generate_name()).is_ok());
    }

    #[test]
    fn ids_are_short_and_distinct() {
        let (a, b) = (new_vm_id(), new_vm_id());
        assert_eq!(a.len(), 10);
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }

    #[test]
    fn memory_takes_mib_or_a_suffix() {
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("1GiB"), Ok(1024));
        for bad in ["0", "", "G", "12T", "-5", "99999999999"] {
            assert_eq!(parse_memory_mib(bad).expect_err(bad).field, "memory");
        }
    }

    #[test]
    fn disk_sizes_take_units_and_mib_by_default() {
        assert_eq!(parse_disk_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_disk_bytes("512"), Ok(512 << 20));
        assert_eq!(parse_disk_bytes("2TiB"), Ok(2 << 40));
        for bad in ["0", "", "G", "1P", "-5", "99999999999999999T"] {
            assert_eq!(parse_disk_bytes(bad).expect_err(bad).field, "disk");
        }
    }

    #[test]
    fn vcpus_are_bounded() {
        assert!(validate_vcpus(0).is_err());
        assert_eq!(validate_vcpus(2), Ok(2));
        assert!(validate_vcpus(33).is_err());
    }
}
