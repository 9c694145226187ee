//! Layers into one tree, pure: entries come in as the layer reader parsed
//! them from tar headers (data stays where the reader put it, named by a
//! [`DataRef`]); a resolved tree comes out, which the ext4 writer writes
//! without any file of the image ever being created on the host.
//!
//! Layers are given top-down (as a manifest lists them, reversed) and
//! applied bottom-up on an in-memory tree, as an applier that extracts
//! each layer onto the one below would, so the result is the tree a guest
//! sees. The rules:
//! - names are cleaned lexically (`a/../b` is `b`; a leading `/` is the
//!   image's root); a `..` that climbs above the root is refused;
//! - within one layer a later entry for a path replaces an earlier one, as
//!   in tar; a directory over a directory keeps the children;
//! - `.wh.NAME` hides NAME of lower layers only, `.wh..wh..opq` hides all
//!   of a directory's lower content; a whiteout and an entry for the same
//!   path in one layer are refused, as are whiteouts of the root;
//! - a symlink among an entry's ancestors is resolved inside the tree, as
//!   the guest kernel would under this root (`..` stops at the root, an
//!   absolute target starts from it), never on the host;
//! - a hardlink's target must be a non-directory the tree holds.
//!
//! What it builds is bounded while it builds ([`Bounds`]): every node made
//! or walked (implied parents, components reached through symlinks,
//! nodes an opaque directory prunes) and an estimate of the memory it
//! holds, so an image is refused before the memory is spent. No walk
//! recurses: the input chooses the depth.

use std::collections::{BTreeMap, VecDeque};

/// Where the layer reader keeps an entry's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRef {
    /// The layer's spool, by its index in the list given to [`flatten`].
    pub layer: usize,
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with setuid, setgid and sticky (0o7777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Full names (`user.x`, `security.capability`) and values.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64, data: DataRef },
    Dir,
    Symlink(String),
    Hardlink(String),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// One tar entry, as the layer reader parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub meta: Meta,
}

/// One layer's entries, in tar order.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    /// For messages: the layer's digest.
    pub name: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("layer {layer}, entry {entry:?}: {reason}")]
pub struct FlattenError {
    pub layer: String,
    pub entry: String,
    pub reason: Refusal,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("its name climbs above the image's root")]
    AboveRoot,
    #[error("it would replace the root directory with a non-directory")]
    ReplacesRoot,
    #[error("it whites out the root")]
    WhiteoutOfRoot,
    #[error("it whites out a path this layer also has an entry for")]
    WhiteoutAndEntry,
    #[error("its parent {0:?} is not a directory")]
    ParentNotDirectory(String),
    #[error("resolving it meets more than {MAX_SYMLINK_HOPS} symlinks")]
    SymlinkLoop,
    #[error("its hardlink target {0:?} is not in the image")]
    HardlinkTargetMissing(String),
    #[error("its hardlink target {0:?} is a directory")]
    HardlinkToDirectory(String),
    #[error("a name component is longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error(
        "the image makes or walks more than {0} nodes (implied directories and paths through symlinks included), the most allowed (image.max_nodes)"
    )]
    TooManyNodes(u64),
    #[error(
        "the image needs more than {} MiB to build, the most allowed (image.max_memory_mib)",
        .0 >> 20
    )]
    TooMuchMemory(u64),
}

/// What a flatten may make and hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Nodes made or walked.
    pub max_nodes: u64,
    /// Bytes held, by estimate, the layers' entries included.
    pub max_memory: u64,
    /// Bytes the layers' entries hold already.
    pub entries_memory: u64,
}

/// What one node costs, by estimate: the node (twice: the arena grows by
/// doubling), its name's allocation and its share of its directory's
/// B-tree; a directory adds a leaf of its own.
pub const NODE_BYTES: u64 = 2 * std::mem::size_of::<Node>() as u64 + 64;
pub const DIR_BYTES: u64 = 512;

/// What a flatten has spent of its [`Bounds`].
struct Spent {
    bounds: Bounds,
    nodes: u64,
    memory: u64,
}

impl Spent {
    fn nodes(&mut self, n: u64) -> Result<(), Refusal> {
        self.nodes += n;
        if self.nodes > self.bounds.max_nodes {
            return Err(Refusal::TooManyNodes(self.bounds.max_nodes));
        }
        Ok(())
    }

    fn memory(&mut self, bytes: u64) -> Result<(), Refusal> {
        self.memory += bytes;
        if self.memory > self.bounds.max_memory {
            return Err(Refusal::TooMuchMemory(self.bounds.max_memory));
        }
        Ok(())
    }

    /// A node made: counted, with what it holds beyond its estimate.
    fn made(&mut self, kind: &NodeKind, meta: &Meta, name: &str) -> Result<(), Refusal> {
        self.nodes(1)?;
        let held = match kind {
            NodeKind::Dir(_) => DIR_BYTES,
            NodeKind::Symlink(target) => target.len() as u64,
            _ => 0,
        };
        self.memory(NODE_BYTES + name.len() as u64 + held + xattr_bytes(meta))
    }
}

/// Bytes a node's xattrs hold, with their allocations.
pub fn xattr_bytes(meta: &Meta) -> u64 {
    meta.xattrs
        .iter()
        .map(|(name, value)| (name.len() + value.len() + 64) as u64)
        .sum()
}

/// As the kernel's limit on symlinks followed in one lookup.
pub const MAX_SYMLINK_HOPS: u32 = 40;
/// ext4's longest name.
pub const MAX_NAME: usize = 255;

pub type NodeId = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir(BTreeMap<String, Child>),
    File { size: u64, data: DataRef },
    Symlink(String),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// A directory's entry: the inode it names and the layer that named it
/// last (what a whiteout or an opaque directory of a higher layer hides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    pub node: NodeId,
    layer: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Meta,
}

/// The flattened image: `nodes[ROOT]` is the root directory; a node named
/// by several directory entries is one inode with hardlinks. Nodes no
/// entry names any more stay in the arena, unreachable.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Bytes it holds, by the estimate its bounds were held to.
    pub memory: u64,
}

pub const ROOT: NodeId = 0;

/// What the writer needs to size the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Inodes reachable from the root.
    pub inodes: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub dirs: u64,
    /// Directory entries, with the bytes of their names.
    pub dir_entries: u64,
    pub name_bytes: u64,
    /// Symlinks too long to live in their inode, and inodes with xattrs:
    /// a block each.
    pub extra_blocks: u64,
}

impl Tree {
    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<String, Child>> {
        match &self.nodes[dir].kind {
            NodeKind::Dir(children) => Some(children),
            _ => None,
        }
    }

    /// Each reachable inode once.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![ROOT];
        seen[ROOT] = true;
        while let Some(id) = stack.pop() {
            let node = &self.nodes[id];
            census.inodes += 1;
            if !node.meta.xattrs.is_empty() {
                census.extra_blocks += 1;
            }
            match &node.kind {
                NodeKind::Dir(children) => {
                    census.dirs += 1;
                    for (name, child) in children {
                        census.dir_entries += 1;
                        census.name_bytes += name.len() as u64;
                        if !seen[child.node] {
                            seen[child.node] = true;
                            stack.push(child.node);
                        }
                    }
                }
                NodeKind::File { size, .. } => {
                    census.files += 1;
                    census.file_bytes += size;
                }
                NodeKind::Symlink(target) if target.len() >= 60 => census.extra_blocks += 1,
                _ => {}
            }
        }
        census
    }

    /// The node at `path`, symlinks not followed (for tests and tools).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        let mut at = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            at = self.children(at)?.get(part)?.node;
        }
        Some(at)
    }
}

/// Applies `top_down` (the top layer first) bottom-up, within `bounds`.
pub fn flatten(top_down: &[Layer], bounds: Bounds) -> Result<Tree, FlattenError> {
    let mut tree = Tree {
        nodes: vec![Node {
            kind: NodeKind::Dir(BTreeMap::new()),
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
        }],
        memory: 0,
    };
    let mut spent = Spent {
        bounds,
        nodes: 1,
        memory: bounds.entries_memory + NODE_BYTES + DIR_BYTES,
    };
    // Layer numbers count up from the bottom, so "lower" is "smaller".
    for (depth, layer) in top_down.iter().rev().enumerate() {
        let level = depth + 1;
        for entry in &layer.entries {
            apply(&mut tree, &mut spent, level, entry).map_err(|reason| FlattenError {
                layer: layer.name.clone(),
                entry: entry.path.clone(),
                reason,
            })?;
        }
    }
    tree.memory = spent.memory - bounds.entries_memory;
    Ok(tree)
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// `path` cleaned lexically: empty and `.` parts dropped, `..` taking the
/// one before it.
fn clean(path: &str) -> Result<Vec<&str>, Refusal> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or(Refusal::AboveRoot)?;
            }
            name if name.len() > MAX_NAME => return Err(Refusal::NameTooLong),
            name => parts.push(name),
        }
    }
    Ok(parts)
}

fn apply(tree: &mut Tree, spent: &mut Spent, level: usize, entry: &Entry) -> Result<(), Refusal> {
    let parts = clean(&entry.path)?;
    let Some((&name, parents)) = parts.split_last() else {
        // The root itself: its metadata, if it stays a directory.
        return match entry.kind {
            EntryKind::Dir => {
                spent.memory(xattr_bytes(&entry.meta))?;
                tree.nodes[ROOT].meta = entry.meta.clone();
                Ok(())
            }
            _ => Err(Refusal::ReplacesRoot),
        };
    };
    if name == OPAQUE {
        if let Some(dir) = resolve_dir(tree, spent, parents, level, false)? {
            prune_lower(tree, spent, dir, level)?;
        }
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT) {
        if matches!(hidden, "" | "." | "..") {
            return Err(Refusal::WhiteoutOfRoot);
        }
        let Some(dir) = resolve_dir(tree, spent, parents, level, false)? else {
            return Ok(()); // Nothing there to hide.
        };
        let children = dir_children(tree, dir);
        match children.get(hidden) {
            Some(child) if child.layer == level => return Err(Refusal::WhiteoutAndEntry),
            Some(_) => {
                children.remove(hidden);
            }
            None => {}
        }
        return Ok(());
    }
    let dir = resolve_dir(tree, spent, parents, level, true)?.ok_or(Refusal::AboveRoot)?;
    let kind = match &entry.kind {
        EntryKind::Hardlink(target) => {
            let node = hardlink_target(tree, spent, target, level)?;
            spent.nodes(1)?;
            spent.memory(NODE_BYTES + name.len() as u64)?;
            set_child(tree, dir, name, Child { node, layer: level });
            return Ok(());
        }
        EntryKind::Dir => {
            let existing = tree.children(dir).and_then(|c| c.get(name)).map(|c| c.node);
            if let Some(node) = existing
                && matches!(tree.nodes[node].kind, NodeKind::Dir(_))
            {
                spent.memory(xattr_bytes(&entry.meta))?;
                tree.nodes[node].meta = entry.meta.clone();
                set_child(tree, dir, name, Child { node, layer: level });
                return Ok(());
            }
            NodeKind::Dir(BTreeMap::new())
        }
        EntryKind::File { size, data } => NodeKind::File {
            size: *size,
            data: *data,
        },
        EntryKind::Symlink(target) => NodeKind::Symlink(target.clone()),
        EntryKind::Char { major, minor } => NodeKind::Char {
            major: *major,
            minor: *minor,
        },
        EntryKind::Block { major, minor } => NodeKind::Block {
            major: *major,
            minor: *minor,
        },
        EntryKind::Fifo => NodeKind::Fifo,
    };
    spent.made(&kind, &entry.meta, name)?;
    let node = tree.nodes.len();
    tree.nodes.push(Node {
        kind,
        meta: entry.meta.clone(),
    });
    set_child(tree, dir, name, Child { node, layer: level });
    Ok(())
}

fn dir_children(tree: &mut Tree, dir: NodeId) -> &mut BTreeMap<String, Child> {
    match &mut tree.nodes[dir].kind {
        NodeKind::Dir(children) => children,
        // resolve_dir answers directories only.
        _ => unreachable!("resolve_dir answered a non-directory"),
    }
}

fn set_child(tree: &mut Tree, dir: NodeId, name: &str, child: Child) {
    dir_children(tree, dir).insert(name.to_string(), child);
}

/// Removes what lower layers put under `dir`, keeping this layer's
/// entries (and the directories on the way to them). Post-order, on a
/// stack of its own: each directory is pruned before its parent decides
/// whether the emptied directory goes too.
fn prune_lower(
    tree: &mut Tree,
    spent: &mut Spent,
    dir: NodeId,
    level: usize,
) -> Result<(), Refusal> {
    // A directory on the stack, with its subdirectories still to prune.
    let subdirs = |tree: &Tree, dir: NodeId| -> Vec<NodeId> {
        tree.children(dir)
            .map(|c| {
                c.values()
                    .map(|c| c.node)
                    .filter(|&n| n != dir && matches!(tree.nodes[n].kind, NodeKind::Dir(_)))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Every entry of every directory walked counts: an opaque marker
    // repeated over a large directory is work, whatever it removes.
    let walked = |tree: &Tree, dir: NodeId| tree.children(dir).map_or(0, |c| c.len() as u64);
    spent.nodes(walked(tree, dir))?;
    let mut stack = vec![(dir, subdirs(tree, dir))];
    while let Some((at, pending)) = stack.last_mut() {
        if let Some(next) = pending.pop() {
            spent.nodes(walked(tree, next))?;
            let below = subdirs(tree, next);
            stack.push((next, below));
            continue;
        }
        let at = *at;
        stack.pop();
        let children = dir_children(tree, at);
        let lower: Vec<String> = children
            .iter()
            .filter(|(_, c)| c.layer < level)
            .map(|(name, _)| name.clone())
            .collect();
        for name in lower {
            let Some(child) = tree.children(at).and_then(|c| c.get(&name)).copied() else {
                continue;
            };
            let kept = match tree.children(child.node) {
                // A directory of a lower layer stays if this layer put
                // something in it.
                Some(inside) => child.node != at && !inside.is_empty(),
                None => false,
            };
            if !kept {
                dir_children(tree, at).remove(&name);
            }
        }
    }
    Ok(())
}

/// The directory `parts` names from the root, following symlinks inside
/// the tree. With `create`, missing directories are made (as an applier
/// makes an entry's parents); without, a missing one answers `None`.
fn resolve_dir(
    tree: &mut Tree,
    spent: &mut Spent,
    parts: &[&str],
    level: usize,
    create: bool,
) -> Result<Option<NodeId>, Refusal> {
    let mut stack = vec![ROOT];
    let mut todo: VecDeque<String> = parts.iter().map(|p| p.to_string()).collect();
    let mut hops = 0;
    let mut walked = String::new();
    while let Some(part) = todo.pop_front() {
        let at = *stack.last().unwrap_or(&ROOT);
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        if part.len() > MAX_NAME {
            return Err(Refusal::NameTooLong);
        }
        walked.push('/');
        walked.push_str(&part);
        let found = tree.children(at).and_then(|c| c.get(&part)).copied();
        let Some(child) = found else {
            if !create {
                return Ok(None);
            }
            let implied = Node {
                kind: NodeKind::Dir(BTreeMap::new()),
                meta: Meta {
                    mode: 0o755,
                    ..Meta::default()
                },
            };
            spent.made(&implied.kind, &implied.meta, &part)?;
            let node = tree.nodes.len();
            tree.nodes.push(implied);
            set_child(tree, at, &part, Child { node, layer: level });
            stack.push(node);
            continue;
        };
        match &tree.nodes[child.node].kind {
            NodeKind::Dir(_) => stack.push(child.node),
            NodeKind::Symlink(target) => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Refusal::SymlinkLoop);
                }
                if target.starts_with('/') {
                    stack.truncate(1);
                }
                let pieces: Vec<&str> = target.split('/').collect();
                spent.nodes(pieces.len() as u64)?;
                for piece in pieces.into_iter().rev() {
                    todo.push_front(piece.to_string());
                }
            }
            _ => return Err(Refusal::ParentNotDirectory(walked)),
        }
    }
    Ok(stack.last().copied())
}

/// A hardlink's target: its parents resolved inside the tree, its last
/// component not followed (a link to a symlink links the symlink).
fn hardlink_target(
    tree: &mut Tree,
    spent: &mut Spent,
    target: &str,
    level: usize,
) -> Result<NodeId, Refusal> {
    let missing = || Refusal::HardlinkTargetMissing(target.to_string());
    let parts = clean(target)?;
    let (&name, parents) = parts.split_last().ok_or_else(missing)?;
    let dir = resolve_dir(tree, spent, parents, level, false)?.ok_or_else(missing)?;
    let node = tree
        .children(dir)
        .and_then(|c| c.get(name))
        .ok_or_else(missing)?
        .node;
    match tree.nodes[node].kind {
        NodeKind::Dir(_) => Err(Refusal::HardlinkToDirectory(target.to_string())),
        _ => Ok(node),
    }
}

#[cfg(test)]
mod tests;
