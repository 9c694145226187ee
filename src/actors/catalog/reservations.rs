//! Reservations: a VM holds its kernel and image from the moment `vm
//! create` chooses them until its record names them; a removal checks them
//! in the same turn as its delete.

use std::collections::{HashMap, HashSet};

use actix::prelude::*;

use super::{CatalogActor, ImageError, KernelError, store_gone};
use crate::actors::store::{Get, List};
use crate::catalog::KernelRecord;
use crate::image::{ImageRecord, Lookup};
use crate::vm::record::VmImage;

/// The VM `vm` chose `kernel` (and the image of digest `image`): they may
/// not go until the VM's record names them (then the record holds them)
/// and [`Unreserve`] ends the reservation.
pub struct Reserve {
    pub kernel: String,
    pub image: Option<VmImage>,
    pub vm: String,
}

impl Message for Reserve {
    type Result = Result<(), VmReserveError>;
}

/// Why a VM cannot have what it chose.
#[derive(Debug, thiserror::Error)]
pub enum VmReserveError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl From<Gone> for VmReserveError {
    fn from(gone: Gone) -> VmReserveError {
        VmReserveError::Kernel(gone.into())
    }
}

impl Handler<Reserve> for CatalogActor {
    type Result = ResponseFuture<Result<(), VmReserveError>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let kernel = msg.kernel.clone();
        let looked = async move {
            let found = store
                .send(Get::<KernelRecord>::new(kernel))
                .await
                .map_err(store_gone)?
                .map_err(KernelError::from)?;
            let images = store
                .send(List::<ImageRecord>::new())
                .await
                .map_err(|_| ImageError::Unavailable("store"))?
                .map_err(ImageError::from)?;
            Ok::<_, VmReserveError>((found, images.records))
        };
        in_one_turn(
            ctx,
            looked.into_actor(self).map(move |looked, act, _| {
                let (kernel, images) = looked?;
                kernel.ok_or(KernelError::NotFound(msg.kernel.clone()))?;
                if let Some(image) = &msg.image {
                    // Removed since the create found it (`image rm` won).
                    if !images.iter().any(|i| i.digest == image.digest) {
                        return Err(ImageError::Lookup(Lookup::NotFound(image.name.clone())).into());
                    }
                    act.image_reservations
                        .entry(image.digest.clone())
                        .or_default()
                        .insert(msg.vm.clone());
                }
                act.reservations
                    .entry(msg.kernel)
                    .or_default()
                    .insert(msg.vm);
                Ok(())
            }),
        )
    }
}

/// Runs `work` with the catalog's mailbox held (`ctx.wait`), so that no
/// other message interleaves between a check and what relies on it, and
/// answers its result.
pub(super) fn in_one_turn<T: Send + 'static, E: Send + From<Gone> + 'static>(
    ctx: &mut Context<CatalogActor>,
    work: impl ActorFuture<CatalogActor, Output = Result<T, E>> + 'static,
) -> ResponseFuture<Result<T, E>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    ctx.wait(work.map(|result, _, _| {
        let _ = answer.send(result);
    }));
    Box::pin(async move { answered.await.unwrap_or(Err(E::from(Gone("catalog")))) })
}

/// A part of the daemon that stopped answering.
pub struct Gone(&'static str);

impl From<Gone> for KernelError {
    fn from(gone: Gone) -> KernelError {
        KernelError::Unavailable(gone.0)
    }
}

impl From<Gone> for ImageError {
    fn from(gone: Gone) -> ImageError {
        ImageError::Unavailable(gone.0)
    }
}

pub struct Unreserve {
    pub kernel: String,
    pub image: Option<String>,
    pub vm: String,
}

impl Message for Unreserve {
    type Result = ();
}

impl Handler<Unreserve> for CatalogActor {
    type Result = ();

    fn handle(&mut self, msg: Unreserve, _: &mut Context<Self>) {
        let unreserve = |reservations: &mut HashMap<String, HashSet<String>>, key: &str| {
            if let Some(vms) = reservations.get_mut(key) {
                vms.remove(&msg.vm);
                if vms.is_empty() {
                    reservations.remove(key);
                }
            }
        };
        unreserve(&mut self.reservations, &msg.kernel);
        if let Some(digest) = &msg.image {
            unreserve(&mut self.image_reservations, digest);
        }
    }
}
