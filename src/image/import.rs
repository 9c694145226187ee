//! One import's file work, blocking, in order: resolve the source, store
//! its blobs (verified), read its layers (in parallel, one inflate each),
//! flatten them, check free space, write the ext4 beside its final name
//! and rename it into place. Whatever it made is removed if it fails or is
//! cancelled; a daemon killed meanwhile leaves files that no image record
//! claims, which the catalog's start-up sweep removes. The caller runs one
//! import at a time (blobs are shared between images).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use super::ext4::{self, Ext4Error, Written};
use super::flatten::{self, FlattenError, Layer};
use super::layer::{self, Budget, LayerError, Limits};
use super::source::{self, Resolved, Source, SourceError};
use super::{ImageRecord, LayerRecord, RunConfig, blob_path, validate_image_name};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Flatten(#[from] FlattenError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error("layer {layer}: its uncompressed digest is {found}, but the config names {expected}")]
    DiffId {
        layer: String,
        expected: String,
        found: String,
    },
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the image needs about {need} MiB in {}, which has {free} MiB free",
        dir.display()
    )]
    NoSpace { dir: PathBuf, need: u64, free: u64 },
    #[error(
        "the image needs about {need} MiB to build its ext4, more than the {cap} MiB allowed (image.max_memory_mib)"
    )]
    Memory { need: u64, cap: u64 },
    #[error("name: {0}")]
    Name(String),
    #[error(
        "name: the image names itself nowhere (no ref name annotation, no repo tag); give --name"
    )]
    Unnamed,
    #[error("the import was cancelled")]
    Cancelled,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where imports keep what they make, and their bounds.
#[derive(Debug, Clone)]
pub struct Store {
    pub blobs: PathBuf,
    pub images: PathBuf,
    pub limits: Limits,
    /// Free bytes left in each image's ext4 beyond its content.
    pub headroom: u64,
}

/// How far an import is: phase, done, total.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// An import's source, the name asked for, and how to hear and stop it.
pub struct Request<'a> {
    pub source: Source,
    pub archive: bool,
    pub name: Option<String>,
    pub cancelled: &'a AtomicBool,
    pub progress: Progress<'a>,
}

/// Files an import made, removed unless it succeeds.
#[derive(Default)]
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Runs the import; answers the record to store (not stored yet).
pub fn import(store: &Store, request: Request<'_>) -> Result<ImageRecord, ImportError> {
    let resolved = source::resolve(&request.source, request.archive)?;
    let name = match request.name.clone().or(resolved.ref_name.clone()) {
        Some(name) => {
            validate_image_name(&name).map_err(ImportError::Name)?;
            name
        }
        None => return Err(ImportError::Unnamed),
    };
    let mut made = Made::default();
    let blobs = store_blobs(store, &request, &resolved, &mut made).inspect_err(|_| {
        // Given up on after a stall, this import no longer holds the
        // import lock: a later one may have found these verified blobs in
        // place and kept them. Unclaimed, they go at the next start.
        if request.source.watch().given_up() {
            made.0.clear();
        }
    })?;
    crate::fault::boundary("image-blobs-stored");
    let hex = resolved.config_digest.trim_start_matches("sha256:");
    let disk = store.images.join(format!("{hex}.ext4"));
    let layers = blobs
        .iter()
        .zip(resolved.config.rootfs().diff_ids())
        .zip(&resolved.layers)
        .map(|(((digest, size), diff_id), blob)| LayerRecord {
            digest: digest.clone(),
            diff_id: diff_id.clone(),
            size: *size,
            media_type: blob.media_type.clone(),
        })
        .collect::<Vec<_>>();
    // One ext4 per digest: another name of this image already made it.
    if !disk.is_file() {
        build_disk(store, &request, &resolved, &layers, &disk)?;
    }
    let disk_bytes = fs::metadata(&disk)
        .map_err(io_err("read the size of", &disk))?
        .len();
    made.0.clear();
    let config = resolved.config.config().clone().unwrap_or_default();
    Ok(ImageRecord {
        name,
        digest: resolved.config_digest.clone(),
        manifest_digest: resolved.manifest_digest.clone(),
        format: resolved.format,
        disk,
        disk_bytes,
        layers,
        config: RunConfig {
            env: config.env().clone().unwrap_or_default(),
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            working_dir: config.working_dir().clone().filter(|w| !w.is_empty()),
            user: config.user().clone().filter(|u| !u.is_empty()),
        },
        created: resolved.config.created().clone(),
        imported_at: Timestamp::now(),
    })
}

/// Copies the config and every layer blob into the blob store, each
/// staged, size-bounded and hashed, and renamed into place only once its
/// digest matches. Answers each layer's digest and size.
fn store_blobs(
    store: &Store,
    request: &Request<'_>,
    resolved: &Resolved,
    made: &mut Made,
) -> Result<Vec<(String, u64)>, ImportError> {
    let dir = store.blobs.join("sha256");
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let config_path = blob_path(&store.blobs, &resolved.config_digest)
        .ok_or_else(|| ImportError::Name("the config digest is not sha256".into()))?;
    if !config_path.exists() {
        let mut staged = staged_in(&dir)?;
        staged
            .as_file_mut()
            .write_all(&resolved.config_bytes)
            .map_err(io_err("write", &config_path))?;
        persist(staged, &config_path, made)?;
    }
    let total: u64 = resolved.layers.iter().filter_map(|l| l.size).sum();
    let mut copied = 0u64;
    let mut stored = Vec::new();
    for blob in &resolved.layers {
        if let Some(path) = blob
            .digest
            .as_deref()
            .and_then(|d| blob_path(&store.blobs, d))
            && path.is_file()
        {
            // Stored by an earlier import, after its digest was checked.
            let size = fs::metadata(&path).map_err(io_err("read", &path))?.len();
            copied += size;
            stored.push((blob.digest.clone().unwrap_or_default(), size));
            continue;
        }
        let (mut reader, len) = request.source.open(&blob.member)?;
        let cap = blob.size.unwrap_or(store.limits.max_unpacked_bytes);
        let setting = match blob.size {
            Some(_) => "bytes, the size its descriptor states",
            None => "bytes; image.max_unpacked_mib",
        };
        if len > cap {
            return Err(SourceError::TooLarge {
                name: blob.member.clone(),
                cap,
                setting,
            }
            .into());
        }
        let mut staged = staged_in(&dir)?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            if request.cancelled.load(Ordering::Relaxed) {
                return Err(ImportError::Cancelled);
            }
            let n = reader.read(&mut buf).map_err(|source| SourceError::Read {
                name: blob.member.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > cap {
                return Err(SourceError::TooLarge {
                    name: blob.member.clone(),
                    cap,
                    setting,
                }
                .into());
            }
            hash.update(&buf[..n]);
            staged
                .as_file_mut()
                .write_all(&buf[..n])
                .map_err(io_err("write a blob in", &dir))?;
            copied += n as u64;
            (request.progress)("copying blobs", copied, total.max(copied));
        }
        let found = format!("sha256:{:x}", hash.finalize());
        if let Some(expected) = &blob.digest
            && *expected != found
        {
            return Err(SourceError::Digest {
                name: blob.member.clone(),
                expected: expected.clone(),
                found,
            }
            .into());
        }
        let path = blob_path(&store.blobs, &found).unwrap_or_else(|| dir.join("invalid"));
        if path.exists() {
            drop(staged); // The same bytes, stored already.
        } else {
            persist(staged, &path, made)?;
        }
        stored.push((found, size));
    }
    Ok(stored)
}

fn staged_in(dir: &Path) -> Result<tempfile::NamedTempFile, ImportError> {
    tempfile::Builder::new()
        .prefix(".staging-")
        .tempfile_in(dir)
        .map_err(io_err("stage a file in", dir))
}

fn persist(
    staged: tempfile::NamedTempFile,
    path: &Path,
    made: &mut Made,
) -> Result<(), ImportError> {
    staged.as_file().sync_all().map_err(io_err("write", path))?;
    staged
        .persist(path)
        .map_err(|e| io_err("move into place", path)(e.error))?;
    made.0.push(path.to_path_buf());
    Ok(())
}

/// Gives the heap's free memory back to the system when dropped: an
/// image build frees hundreds of megabytes on whichever thread ran it,
/// and glibc keeps a thread's freed memory in that thread's arena, so
/// builds on different threads would each keep their peak.
struct HeapTrim;

impl Drop for HeapTrim {
    fn drop(&mut self) {
        #[cfg(target_env = "gnu")]
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes a plain integer and only returns free
        // pages of glibc's own heaps.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
}

/// Reads the stored layers, flattens them and writes the ext4 at `disk`.
fn build_disk(
    store: &Store,
    request: &Request<'_>,
    resolved: &Resolved,
    layers: &[LayerRecord],
    disk: &Path,
) -> Result<(), ImportError> {
    // Dropped last, after the tree and the entries.
    let _give_back = HeapTrim;
    fs::create_dir_all(&store.images).map_err(io_err("create", &store.images))?;
    let budget = Budget::default();
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let read = read_layers(store, layers, &budget, request, total)?;
    for (got, expected) in read.iter().zip(layers) {
        if got.diff_id != expected.diff_id {
            return Err(ImportError::DiffId {
                layer: expected.digest.clone(),
                expected: expected.diff_id.clone(),
                found: got.diff_id.clone(),
            });
        }
    }
    let (mut top_down, spools): (Vec<Layer>, Vec<File>) =
        read.into_iter().map(|r| (r.layer, r.spool)).unzip();
    top_down.reverse();
    let limits = store.limits;
    let bounds = flatten::Bounds {
        max_nodes: limits.max_nodes,
        max_memory: limits.max_memory_bytes,
        entries_memory: budget.memory.load(Ordering::Relaxed),
    };
    let tree = flatten::flatten(&top_down, bounds)?;
    drop(top_down);
    let census = tree.census();
    // The tree stays while the ext4 is built: both within the one bound.
    let building = tree.memory + ext4::build_memory(&census);
    if building > limits.max_memory_bytes {
        return Err(ImportError::Memory {
            need: building.div_ceil(1 << 20),
            cap: limits.max_memory_bytes >> 20,
        });
    }
    let (size, _) = ext4::size_for(&census, 0);
    let free = free_bytes(&store.images)?;
    if free < size {
        return Err(ImportError::NoSpace {
            dir: store.images.clone(),
            need: size.div_ceil(1 << 20),
            free: free >> 20,
        });
    }
    let hex = resolved.config_digest.trim_start_matches("sha256:");
    let staged = store
        .images
        .join(format!(".staging-{hex}-{}.ext4", std::process::id()));
    let mut made = Made(vec![staged.clone()]);
    let mut uuid = [0u8; 16];
    let digest = Sha256::digest(resolved.config_digest.as_bytes());
    uuid.copy_from_slice(&digest[..16]);
    let epoch = resolved
        .config
        .created()
        .as_deref()
        .and_then(|c| c.parse::<Timestamp>().ok())
        .map_or(0, |t| t.as_second());
    let written = Written::default();
    let wrote = std::thread::scope(|scope| {
        let work = scope.spawn(|| {
            ext4::write(
                &tree,
                &spools,
                &staged,
                store.headroom,
                uuid,
                epoch,
                &written,
            )
        });
        while !work.is_finished() {
            if request.cancelled.load(Ordering::Relaxed) {
                written.cancelled.store(true, Ordering::Relaxed);
            }
            let files = written.files.load(Ordering::Relaxed);
            (request.progress)("writing ext4", files, census.files);
            std::thread::park_timeout(Duration::from_millis(200));
        }
        work.join().unwrap_or(Err(Ext4Error::WriterPanicked))
    });
    wrote?;
    if request.cancelled.load(Ordering::Relaxed) {
        return Err(ImportError::Cancelled);
    }
    fs::rename(&staged, disk).map_err(io_err("move into place", disk))?;
    made.0.clear();
    if let Ok(dir) = File::open(&store.images) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Each stored layer read into entries and a spool, on up to as many
/// threads as there are cores, reporting compressed bytes read.
fn read_layers(
    store: &Store,
    layers: &[LayerRecord],
    budget: &Budget,
    request: &Request<'_>,
    total: u64,
) -> Result<Vec<layer::ReadLayer>, ImportError> {
    // Each reading thread's buffers count against the memory bound: as
    // many threads as cores, and as a quarter of the bound holds.
    let affordable = (store.limits.max_memory_bytes / 4 / layer::LAYER_READ_BYTES).max(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(layers.len())
        .min(usize::try_from(affordable).unwrap_or(usize::MAX))
        .max(1);
    budget
        .memory
        .fetch_add(threads as u64 * layer::LAYER_READ_BYTES, Ordering::Relaxed);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (done, results) = crossbeam_channel::bounded(layers.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (done, next) = (done.clone(), &next);
            scope.spawn(move || {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(index) else {
                        return;
                    };
                    let result = read_one(store, index, layer, budget);
                    let failed = result.is_err();
                    if done.send((index, result)).is_err() || failed {
                        // One failure ends the import: stop the others.
                        budget.cancelled.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
        drop(done);
        let mut read: Vec<Option<layer::ReadLayer>> = layers.iter().map(|_| None).collect();
        let mut first_error = None;
        loop {
            if request.cancelled.load(Ordering::Relaxed) {
                budget.cancelled.store(true, Ordering::Relaxed);
            }
            match results.recv_timeout(Duration::from_millis(200)) {
                Ok((index, Ok(layer))) => read[index] = Some(layer),
                Ok((_, Err(e))) => {
                    // A layer stopped by another's failure says so; keep
                    // the failure that stopped it.
                    let stopped =
                        |e: &ImportError| matches!(e, ImportError::Layer(LayerError::Cancelled));
                    if first_error.as_ref().is_none_or(stopped) && !stopped(&e)
                        || first_error.is_none()
                    {
                        first_error = Some(e);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            (request.progress)("reading layers", budget.read.load(Ordering::Relaxed), total);
        }
        if request.cancelled.load(Ordering::Relaxed) {
            return Err(ImportError::Cancelled);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(read.into_iter().flatten().collect())
    })
}

fn read_one(
    store: &Store,
    index: usize,
    layer: &LayerRecord,
    budget: &Budget,
) -> Result<layer::ReadLayer, ImportError> {
    let path = blob_path(&store.blobs, &layer.digest)
        .ok_or_else(|| ImportError::Name(format!("{} is not a sha256 digest", layer.digest)))?;
    let blob = File::open(&path).map_err(io_err("open", &path))?;
    // Unnamed: the spool is gone with its descriptor, whatever happens.
    let spool = tempfile::tempfile_in(&store.images).map_err(io_err("spool in", &store.images))?;
    Ok(layer::read_layer(
        &layer.digest,
        index,
        blob,
        spool,
        store.limits,
        budget,
    )?)
}

fn free_bytes(dir: &Path) -> Result<u64, ImportError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| io_err("stat", dir)(e.into()))?;
    Ok(stat.blocks_available() * stat.fragment_size())
}
