//! Image creation (QEMU: `qcow2_co_create`, run by the `blockdev-create`
//! job on an existing node).
//!
//! As QEMU: a header with an empty L1 table, a one-cluster refcount table
//! at cluster 1, one refcount block at cluster 2 counting clusters 0-2;
//! then the image is opened and grown to its size, which allocates the L1
//! table through the ordinary allocator (so refcount table growth is the
//! same code as at run time).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;

use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::io::ReqFlags;
use crate::job::{Job, JobDriver, JobFailure};

use super::header::{self, NewHeader};
use super::state::put64;

/// `BlockdevCreateOptionsQcow2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOpts {
    /// `size`.
    pub size: u64,
    /// `version`: 2 or 3 (default 3).
    pub version: u32,
    /// `cluster-size` (default 64 KiB).
    pub cluster_size: u64,
    /// `backing-file`.
    pub backing_file: Option<String>,
    /// `backing-fmt`.
    pub backing_fmt: Option<String>,
    /// `extended-l2`.
    pub extended_l2: bool,
    /// `lazy-refcounts`.
    pub lazy_refcounts: bool,
    /// `refcount-bits` (default 16).
    pub refcount_bits: u32,
}

impl Default for CreateOpts {
    fn default() -> Self {
        CreateOpts {
            size: 0,
            version: 3,
            cluster_size: 65536,
            backing_file: None,
            backing_fmt: None,
            extended_l2: false,
            lazy_refcounts: false,
            refcount_bits: 16,
        }
    }
}

impl CreateOpts {
    /// QEMU's checks in `qcow2_co_create`, with its texts.
    pub fn check(&self) -> Result<(), String> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(String::from(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if !self.size.is_multiple_of(512) {
            return Err(String::from("Image size must be a multiple of 512 bytes"));
        }
        if self.version == 2 && self.lazy_refcounts {
            return Err(String::from(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.version == 2 && self.extended_l2 {
            return Err(String::from(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(String::from(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(String::from(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return Err(String::from(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err(String::from(
                "Backing format cannot be used without backing file",
            ));
        }
        if self
            .backing_file
            .as_ref()
            .is_some_and(|b| b.len() > header::MAX_BACKING_NAME as usize)
        {
            return Err(String::from("Backing file name too long"));
        }
        Ok(())
    }
}

/// Formats the node behind `f` as a qcow2 image; `name` is for messages.
pub async fn create(f: &Child, name: &str, o: &CreateOpts) -> Result<(), String> {
    o.check()?;
    let cs = o.cluster_size;
    let bits = cs.trailing_zeros();
    let order = o.refcount_bits.trailing_zeros();
    let first = header::build(&NewHeader {
        cluster_bits: bits,
        size: 0,
        refcount_table_offset: cs,
        version: o.version,
        incompatible: if o.extended_l2 {
            header::incompat::EXTL2
        } else {
            0
        },
        compatible: if o.lazy_refcounts {
            header::compat::LAZY_REFCOUNTS
        } else {
            0
        },
        refcount_order: order,
        backing_file: o.backing_file.as_deref(),
        backing_format: o.backing_fmt.as_deref(),
    })
    .ok_or_else(|| String::from("qcow2 header exceeds cluster size"))?;
    let werr = |e: crate::io::IoError| format!("Could not write qcow2 header: {e}");
    let mut table = vec![0u8; cs as usize];
    put64(&mut table, 0, 2 * cs);
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 {
        super::refcount::rc_set(&mut block, c, o.refcount_bits, 1);
    }
    // Refcounts before the header that makes them reachable.
    f.write(2 * cs, block, ReqFlags::NONE).await.map_err(werr)?;
    f.write(cs, table, ReqFlags::NONE).await.map_err(werr)?;
    f.flush().await.map_err(werr)?;
    f.write(0, first, ReqFlags::NONE).await.map_err(werr)?;
    f.flush().await.map_err(werr)?;
    let mut st = super::open::load(f, name, false)
        .await
        .map_err(|e| format!("Could not open the new image: {e}"))?;
    st.truncate(f, None, o.size)
        .await
        .map_err(|e| format!("Could not resize image: {e}"))?;
    st.flush_caches(f)
        .await
        .map_err(|e| format!("Could not flush the new image: {e}"))?;
    f.flush()
        .await
        .map_err(|e| format!("Could not flush the new image: {e}"))?;
    Ok(())
}

/// The `blockdev-create` job (QEMU: `blockdev_create_run`).
pub struct CreateJob {
    /// The node to format.
    pub node: Rc<Node>,
    /// What to create.
    pub opts: CreateOpts,
}

impl JobDriver for CreateJob {
    fn job_type(&self) -> &str {
        "create"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> crate::io::BoxFuture<'static, Result<(), JobFailure>> {
        alloc::boxed::Box::pin(async move {
            let blk = job
                .add_backend(
                    &self.node,
                    Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
                    Perm::ALL,
                )
                .map_err(|e| e.to_string())?;
            let root = blk.root().ok_or_else(|| String::from("No medium found"))?;
            job.set_progress(0, 1);
            create(&root, self.node.name(), &self.opts).await?;
            job.set_progress(1, 1);
            Ok(())
        })
    }
}
