//! The vmlinux inside an x86 bzImage: the setup header says where the
//! compressed payload is, its magic says how it is compressed, and the
//! result is the ELF Firecracker boots.

use std::io::Read;

use super::{Capped, KernelError, UnpackLimit};

/// Where the setup header's fields live (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The kernel's legacy LZ4 framing (`lz4 -l`): 8 MiB blocks.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn bad(reason: impl Into<String>) -> KernelError {
    KernelError::BzImage(reason.into())
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, KernelError> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad("truncated setup header"))
}

/// The compressed payload of a bzImage.
pub fn payload(image: &[u8]) -> Result<&[u8], KernelError> {
    if image.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err(bad("no HdrS setup header; not a bzImage"));
    }
    let sects = match image.get(SETUP_SECTS) {
        Some(0) => 4,
        Some(&n) => n as usize,
        None => return Err(bad("truncated setup header")),
    };
    let start = (sects + 1) * 512 + u32_at(image, PAYLOAD_OFFSET)? as usize;
    let len = u32_at(image, PAYLOAD_LENGTH)? as usize;
    image
        .get(start..start + len)
        .ok_or_else(|| bad("the payload runs past the end of the image"))
}

/// Decompresses a bzImage's payload to the vmlinux ELF.
/// A payload that unpacks past `limit` is refused.
pub fn vmlinux(image: &[u8], limit: UnpackLimit) -> Result<Vec<u8>, KernelError> {
    let payload = payload(image)?;
    let mut out = Vec::new();
    let failed = |format: &str, e: &dyn std::fmt::Display| bad(format!("{format} payload: {e}"));
    match payload {
        [0x1f, 0x8b, ..] => {
            Capped::new(flate2::read::GzDecoder::new(payload), limit)
                .read_to_end(&mut out)
                .map_err(|e| failed("gzip", &e))?;
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => {
            Capped::new(liblzma::read::XzDecoder::new(payload), limit)
                .read_to_end(&mut out)
                .map_err(|e| failed("xz", &e))?;
        }
        // Legacy `.lzma`: properties byte 0x5d, then a little-endian
        // dictionary size that is never past 64 MiB.
        [0x5d, 0x00, 0x00, ..] => {
            // The decoder's own memory limit: its dictionary, at most 64 MiB.
            liblzma::stream::Stream::new_lzma_decoder(256 << 20)
                .map_err(std::io::Error::from)
                .and_then(|stream| {
                    Capped::new(liblzma::read::XzDecoder::new_stream(payload, stream), limit)
                        .read_to_end(&mut out)
                })
                .map_err(|e| failed("lzma", &e))?;
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            zstd::stream::read::Decoder::new(payload)
                .and_then(|d| Capped::new(d, limit).read_to_end(&mut out))
                .map_err(|e| failed("zstd", &e))?;
        }
        _ if payload.starts_with(&LZ4_LEGACY_MAGIC) => out = lz4_legacy(payload, limit)?,
        _ => {
            let magic: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
            return Err(bad(format!(
                "payload compressed in an unsupported format (magic {})",
                magic.join(" ")
            )));
        }
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF vmlinux"));
    }
    Ok(out)
}

/// Legacy LZ4: the magic, then blocks of (u32 LE compressed length, LZ4
/// block); the magic may repeat between concatenated streams. The kernel
/// appends the uncompressed size (u32 LE), which reads as a block running
/// past the end: it must be all that is left, and it must match.
pub fn lz4_legacy(data: &[u8], limit: UnpackLimit) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    let mut at = LZ4_LEGACY_MAGIC.len();
    while let Some(len) = data.get(at..at + 4) {
        if len == LZ4_LEGACY_MAGIC {
            at += 4;
            continue;
        }
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(block) = data.get(at + 4..at + 4 + len) else {
            break;
        };
        let decoded = lz4_flex::block::decompress(block, LZ4_LEGACY_BLOCK)
            .map_err(|e| bad(format!("lz4 block at byte {at}: {e}")))?;
        if (out.len() + decoded.len()) as u64 > limit.0 {
            return Err(bad(limit.exceeded().to_string()));
        }
        out.extend_from_slice(&decoded);
        at += 4 + len;
    }
    match data.get(at..) {
        Some([]) => {}
        Some(&[a, b, c, d]) => {
            let size = u32::from_le_bytes([a, b, c, d]);
            // The kernel writes the size modulo 2^32.
            if size != out.len() as u32 {
                return Err(bad(format!(
                    "lz4 payload decodes to {} bytes but its trailer says {size}",
                    out.len()
                )));
            }
        }
        _ => return Err(bad(format!("lz4 payload truncated at byte {at}"))),
    }
    if out.is_empty() {
        return Err(bad("empty lz4 payload"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A bzImage-shaped file: 2 setup sectors plus the boot sector, then
    /// the payload at offset 100 of the protected-mode part.
    fn image(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 3 * 512 + 100];
        image[SETUP_SECTS] = 2;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&100u32.to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(b"trailing");
        image
    }

    fn elf() -> Vec<u8> {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..5000u32).flat_map(|i| (i % 251).to_le_bytes()));
        elf
    }

    #[test]
    fn gzip_xz_lzma_and_zstd_payloads_decompress_to_the_elf() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf()).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(
            vmlinux(&image(&gz), UnpackLimit::DEFAULT).expect("gzip"),
            elf()
        );
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&elf()).expect("xz");
        let xz = xz.finish().expect("xz");
        assert_eq!(
            vmlinux(&image(&xz), UnpackLimit::DEFAULT).expect("xz"),
            elf()
        );
        let zst = zstd::encode_all(&elf()[..], 1).expect("zstd");
        assert_eq!(
            vmlinux(&image(&zst), UnpackLimit::DEFAULT).expect("zstd"),
            elf()
        );
        let options = liblzma::stream::LzmaOptions::new_preset(1).expect("preset");
        let stream = liblzma::stream::Stream::new_lzma_encoder(&options).expect("lzma");
        let mut lzma = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        lzma.write_all(&elf()).expect("lzma");
        let mut lzma = lzma.finish().expect("lzma");
        lzma.extend_from_slice(&(elf().len() as u32).to_le_bytes());
        assert_eq!(
            vmlinux(&image(&lzma), UnpackLimit::DEFAULT).expect("lzma"),
            elf()
        );
    }

    #[test]
    fn legacy_lz4_blocks_decode_and_the_appended_size_is_checked() {
        let data = elf();
        let (first, second) = data.split_at(7000);
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        for part in [first, second] {
            let block = lz4_flex::block::compress(part);
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        let blocks = payload.clone();
        payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(
            vmlinux(&image(&payload), UnpackLimit::DEFAULT).expect("lz4"),
            data
        );
        // A stream cut inside a block, or a trailer that disagrees, is refused.
        let cut = lz4_legacy(&blocks[..blocks.len() - 10], UnpackLimit::DEFAULT).expect_err("cut");
        assert!(cut.to_string().contains("truncated"), "{cut}");
        let mut wrong = blocks;
        wrong.extend_from_slice(&7u32.to_le_bytes());
        let wrong = lz4_legacy(&wrong, UnpackLimit::DEFAULT).expect_err("wrong size");
        assert!(wrong.to_string().contains("trailer says 7"), "{wrong}");
    }

    #[test]
    fn what_is_not_a_bzimage_or_not_an_elf_is_refused_with_the_reason() {
        let error = vmlinux(b"plain file", UnpackLimit::DEFAULT).expect_err("not a bzImage");
        assert!(error.to_string().contains("HdrS"), "{error}");
        let unknown = vmlinux(&image(b"BZh91AY&SY"), UnpackLimit::DEFAULT).expect_err("bzip2");
        assert!(unknown.to_string().contains("unsupported"), "{unknown}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"not an elf").expect("gzip");
        let not_elf = vmlinux(&image(&gz.finish().expect("gzip")), UnpackLimit::DEFAULT)
            .expect_err("not elf");
        assert!(not_elf.to_string().contains("not an ELF"), "{not_elf}");
        let mut short = image(b"abc");
        short.truncate(3 * 512 + 101);
        assert!(payload(&short).is_err());
    }
}
