//! A flattened tree into an ext4 image, through `mkext4` (pinned: a 0.0.x
//! API): every inode is declared, the layout sealed, then each regular
//! file's bytes are copied once from its layer's spool to its final
//! extents. Extents, hashed directory indexes, fast symlinks, xattrs and a
//! journal are the crate's; what this module adds is the size: content
//! plus metadata plus the configured headroom, grown and tried again if
//! the estimate was short. Blocking: callers run it on a blocking thread.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mkext4::{FsBuilder, InodeCount, InodeHandle, Meta, Options, SpecialKind};

use super::Section;
use super::flatten::{self, Census, NodeId, NodeKind, Tree};

const BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("cannot declare {path:?} in the image: {reason}")]
    Declare { path: String, reason: String },
    #[error("cannot lay out the image ({size} bytes): {reason}")]
    Layout { size: u64, reason: String },
    #[error("cannot write the image {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot fill {path:?} in the image: {reason}")]
    Fill { path: String, reason: String },
    #[error("the import was cancelled")]
    Cancelled,
    #[error("the ext4 writer thread panicked (a bug in banger)")]
    WriterPanicked,
}

/// An image's size and inode count for `census`, with `headroom` bytes
/// free for the guest. Pure: the estimate errs large; the writer grows
/// it if sealing still finds it short.
pub fn size_for(census: &Census, headroom: u64) -> (u64, u32) {
    let data_blocks = census.file_bytes.div_ceil(BLOCK) + census.files; // + extent slack
    // A directory entry is 8 bytes plus its name, 4-aligned; leaves are
    // kept about three quarters full by the index.
    let dir_bytes = census.dir_entries * 12 + census.name_bytes;
    let dir_blocks = (dir_bytes * 4 / 3).div_ceil(BLOCK) + census.dirs * 2;
    let inodes = (census.inodes + census.inodes / 10 + 1024).min(u32::MAX as u64 / 2);
    let inode_blocks = (inodes * 256).div_ceil(BLOCK);
    let content = (data_blocks + dir_blocks + census.extra_blocks + inode_blocks) * BLOCK;
    // Journal, bitmaps and descriptors: a few percent, and at least the
    // crate's smallest journal.
    let overhead = (content / 16).max(32 << 20);
    let size = (content + overhead + headroom).div_ceil(BLOCK) * BLOCK;
    (size, inodes as u32)
}

/// The memory building an image of `census` takes, by estimate, the tree
/// itself aside: mkext4's declarations (a node, a name key and its entry
/// per inode and directory entry), what sealing adds per inode (side
/// tables, the inode table it keeps), a block held per directory, long
/// symlink and spilled xattr block, bitmaps by the image's size, and
/// this module's own maps. Errs large.
pub fn build_memory(census: &Census) -> u64 {
    let (size, _) = size_for(census, 0);
    (8 << 20)
        + census.inodes * 800
        + census.dir_entries * 128
        + census.name_bytes * 2
        + (census.dirs + census.extra_blocks) * (BLOCK + 64)
        + size / 8192
}

/// Progress of one write, read from another thread.
#[derive(Debug, Default)]
pub struct Written {
    pub files: AtomicU64,
    pub cancelled: AtomicBool,
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image {
    pub size: u64,
    pub data_bytes: u64,
}

/// Writes `tree` to `path` (created), reading file bytes from `spools`
/// (indexed by each file's `DataRef::layer`). `uuid` and `epoch` make the
/// image reproducible.
pub fn write(
    tree: &Tree,
    spools: &[File],
    path: &Path,
    headroom: u64,
    uuid: [u8; 16],
    epoch: i64,
    progress: &Written,
) -> Result<Image, Ext4Error> {
    let census = tree.census();
    let (mut size, inodes) = size_for(&census, headroom);
    // Sealing is what finds an estimate short; it reads no file bytes, so
    // trying again costs only the declarations.
    let mut tries = 0;
    let (layout, files) = loop {
        let mut options = Options::new(size, uuid, epoch);
        options.inodes = InodeCount::Exact(inodes);
        options.reserved_percent = 0;
        options.label = Some("banger-image".into());
        let (builder, files) = declare(tree, options)?;
        match builder.seal() {
            Ok(layout) => break (layout, files),
            Err(e) if tries < 4 => {
                tracing::debug!(size, error = %e, "image estimate short; growing it");
                size = (size + size / 2).div_ceil(BLOCK) * BLOCK;
                tries += 1;
            }
            Err(e) => {
                return Err(Ext4Error::Layout {
                    size,
                    reason: e.to_string(),
                });
            }
        }
    };
    let write_err = |source| Ext4Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut sink = mkext4::sink::FileSink::create(path, layout.image_len()).map_err(write_err)?;
    let mut writer = layout.writer(&mut sink).map_err(|e| Ext4Error::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    for &(handle, node) in &files {
        if progress.cancelled.load(Ordering::Relaxed) {
            return Err(Ext4Error::Cancelled);
        }
        let NodeKind::File { size, data } = tree.nodes[node].kind else {
            continue;
        };
        if size == 0 {
            continue;
        }
        let spool = spools.get(data.layer).ok_or_else(|| Ext4Error::Fill {
            path: path_of(tree, node),
            reason: format!("no spool for layer {}", data.layer),
        })?;
        let mut from = Section::new(spool, data.offset, size);
        writer
            .fill(handle, &mut from)
            .map_err(|e| Ext4Error::Fill {
                path: path_of(tree, node),
                reason: e.to_string(),
            })?;
        progress.files.fetch_add(1, Ordering::Relaxed);
    }
    let summary = writer.finish().map_err(|e| Ext4Error::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    sink.into_file().sync_all().map_err(write_err)?;
    Ok(Image {
        size: summary.image_len,
        data_bytes: summary.data_bytes,
    })
}

/// Declares every reachable inode, depth first in name order; answers
/// the builder and each regular file's handle and node, in the order they
/// were declared (the order their extents ascend). Paths are made only
/// for an error's message: a deep tree's would cost its depth squared.
#[allow(clippy::type_complexity)]
fn declare(
    tree: &Tree,
    options: Options,
) -> Result<(FsBuilder, Vec<(InodeHandle, NodeId)>), Ext4Error> {
    let fail = |node: NodeId, e: mkext4::Error| Ext4Error::Declare {
        path: path_of(tree, node),
        reason: e.to_string(),
    };
    let mut builder = FsBuilder::new(options).map_err(|e| fail(flatten::ROOT, e))?;
    let root = &tree.nodes[flatten::ROOT];
    builder
        .set_meta(mkext4::ROOT, meta(&root.meta))
        .map_err(|e| fail(flatten::ROOT, e))?;
    set_xattrs(&mut builder, mkext4::ROOT, &root.meta).map_err(|e| fail(flatten::ROOT, e))?;
    let mut declared: HashMap<NodeId, InodeHandle> = HashMap::new();
    let mut files = Vec::new();
    let mut stack = vec![(flatten::ROOT, mkext4::ROOT)];
    while let Some((dir, handle)) = stack.pop() {
        let Some(children) = tree.children(dir) else {
            continue;
        };
        let mut subdirs = Vec::new();
        for (name, child) in children {
            if let Some(&existing) = declared.get(&child.node) {
                builder
                    .hardlink(handle, name, existing)
                    .map_err(|e| fail(child.node, e))?;
                continue;
            }
            let node = &tree.nodes[child.node];
            let m = meta(&node.meta);
            let made = match &node.kind {
                NodeKind::Dir(_) => {
                    let made = builder.mkdir(handle, name, m);
                    if let Ok(made) = made {
                        subdirs.push((child.node, made));
                    }
                    made
                }
                NodeKind::File { size, .. } => {
                    let made = builder.file(handle, name, m, *size);
                    if let Ok(made) = made {
                        files.push((made, child.node));
                    }
                    made
                }
                NodeKind::Symlink(target) => builder.symlink(handle, name, target, m),
                NodeKind::Char { major, minor } => builder.mknod(
                    handle,
                    name,
                    m,
                    SpecialKind::Char {
                        major: *major,
                        minor: *minor,
                    },
                ),
                NodeKind::Block { major, minor } => builder.mknod(
                    handle,
                    name,
                    m,
                    SpecialKind::Block {
                        major: *major,
                        minor: *minor,
                    },
                ),
                NodeKind::Fifo => builder.mknod(handle, name, m, SpecialKind::Fifo),
            }
            .map_err(|e| fail(child.node, e))?;
            set_xattrs(&mut builder, made, &node.meta).map_err(|e| fail(child.node, e))?;
            declared.insert(child.node, made);
        }
        // Popped in reverse, so directories are walked in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((builder, files))
}

/// A path that names `node` in `tree`, for messages: found breadth first
/// from the root (the shortest, for a node with hardlinks).
fn path_of(tree: &Tree, node: NodeId) -> String {
    let mut parents: HashMap<NodeId, (NodeId, &str)> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([flatten::ROOT]);
    while let Some(dir) = queue.pop_front() {
        if dir == node {
            break;
        }
        for (name, child) in tree.children(dir).into_iter().flatten() {
            if child.node != flatten::ROOT && !parents.contains_key(&child.node) {
                parents.insert(child.node, (dir, name.as_str()));
                queue.push_back(child.node);
            }
        }
    }
    let mut names = Vec::new();
    let mut at = node;
    while let Some(&(parent, name)) = parents.get(&at) {
        names.push(name);
        at = parent;
    }
    names.reverse();
    format!("/{}", names.join("/"))
}

fn meta(m: &flatten::Meta) -> Meta {
    Meta::new(m.mode & 0o7777, m.uid, m.gid, m.mtime)
}

fn set_xattrs(
    builder: &mut FsBuilder,
    handle: InodeHandle,
    m: &flatten::Meta,
) -> mkext4::Result<()> {
    for (name, value) in &m.xattrs {
        builder.set_xattr(handle, name, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_covers_content_inodes_and_headroom() {
        let census = Census {
            inodes: 20_001,
            files: 20_000,
            file_bytes: 20_000 * 100,
            dirs: 1,
            dir_entries: 20_000,
            name_bytes: 20_000 * 10,
            extra_blocks: 0,
        };
        let (size, inodes) = size_for(&census, 64 << 20);
        assert_eq!(size % BLOCK, 0);
        assert!(inodes as u64 > census.inodes);
        // Each small file takes a block of its own.
        assert!(size > 20_000 * BLOCK + (64 << 20), "{size}");
        let (empty, _) = size_for(&Census::default(), 0);
        assert!(empty >= 32 << 20, "room for the journal: {empty}");
    }
}
