//! Opening nodes from options (QEMU: `bdrv_open` with nested options —
//! `bdrv_open_inherit`, `bdrv_open_child`, `bdrv_open_common` — fed by the
//! QAPI `BlockdevOptions` union that `blockdev-add` and `--blockdev` take).
//!
//! Two phases, so that bad input changes nothing:
//!
//! 1. [`parse_blockdev`] reads and type-checks the whole tree of options —
//!    the common ones here, the driver's own through its [`DriverClass`] —
//!    into a [`BlockdevSpec`]. A child (`file`, `image`, `children`) is
//!    either a *reference* to an existing node by node-name or a nested
//!    *definition*. Nested definitions inherit `read-only` and the cache
//!    options from their parent and default to `discard=unmap`, as QEMU's
//!    `bdrv_inherited_options` does.
//! 2. [`open_blockdev`] opens children first (a reference takes a new
//!    reference on the node, a definition opens a node with an automatic
//!    `#blockNNN` name unless it names itself), then the driver, then the
//!    node with its edges. On any failure every node it opened is closed
//!    again and every reference it took is dropped.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::{Map, Value};

use crate::driver::BlockDriver;
use crate::graph::node::{DetectZeroes, Node, NodeOptions, unref};
use crate::graph::permission::ChildRole;
use crate::graph::registry::{NewChild, Registry};
use crate::io::BoxFuture;
use crate::options::Opts;
use crate::qmp::QmpError;

/// Opens the driver instance once the children are open (QEMU: the
/// driver's `bdrv_open`/`bdrv_file_open`). Errors are QEMU's texts.
pub type Opener = Box<dyn FnOnce(&OpenCtx<'_>) -> Result<Box<dyn BlockDriver>, String>>;

/// How a driver class reads its options (see [`DriverClass`]).
pub type ParseFn = dyn Fn(&mut DriverOpts<'_, '_>) -> Result<Opener, QmpError>;

/// A driver that `blockdev-add` can name (QEMU: a `BlockDriver` class and
/// its `BlockdevOptions<Driver>` QAPI branch). `parse` may capture state,
/// e.g. the kernel's table of probed disks for a `virtio-blk` class.
#[derive(Clone)]
pub struct DriverClass {
    /// The `driver` value.
    pub name: &'static str,
    /// Reads the driver's own options (and declares its children), checks
    /// their types, returns how to open it.
    pub parse: Rc<ParseFn>,
}

impl DriverClass {
    /// A class called `name` parsed by `parse`.
    pub fn new(
        name: &'static str,
        parse: impl Fn(&mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> + 'static,
    ) -> DriverClass {
        DriverClass {
            name,
            parse: Rc::new(parse),
        }
    }
}

/// What an [`Opener`] gets: the registry and the opened children.
pub struct OpenCtx<'a> {
    /// The registry (clock, executor, objects such as throttle groups).
    pub registry: &'a Rc<Registry>,
    /// The node's common options.
    pub options: &'a NodeOptions,
    /// The opened children, in declaration order.
    pub children: &'a [NewChild],
}

impl OpenCtx<'_> {
    /// The child that will be attached as `name`.
    pub fn child(&self, name: &str) -> Option<&Rc<Node>> {
        self.children
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, c)| c)
    }
}

/// Where a child comes from.
pub enum ChildSource {
    /// An existing node (or a named backend's root), by name.
    Reference(String),
    /// A node to open.
    Definition(Box<BlockdevSpec>),
}

/// A declared child.
pub struct ChildSpec {
    /// Edge name (`file`, `children.0`).
    pub name: String,
    /// Edge role.
    pub role: ChildRole,
    /// Where it comes from.
    pub source: ChildSource,
}

/// A fully checked node definition.
pub struct BlockdevSpec {
    /// `node-name`, if given.
    pub node_name: Option<String>,
    /// The driver name.
    pub driver: &'static str,
    /// Common options.
    pub common: NodeOptions,
    /// The driver's opener.
    pub opener: Opener,
    /// Children to open or reference first.
    pub children: Vec<ChildSpec>,
    /// The options as given (kept on the node for `json:` filenames).
    pub options: Map<String, Value>,
}

/// The parse context a [`DriverClass`] reads its options from.
pub struct DriverOpts<'o, 'a> {
    /// The node's options object (common members already read).
    pub opts: &'o Opts<'a>,
    /// The node's common options, as children inherit them.
    pub common: &'o NodeOptions,
    drivers: &'o [DriverClass],
    children: Vec<ChildSpec>,
}

impl DriverOpts<'_, '_> {
    fn child_from(
        &self,
        path: &str,
        name: String,
        role: ChildRole,
        v: &Value,
    ) -> Result<ChildSpec, QmpError> {
        let source = match v {
            Value::String(s) => ChildSource::Reference(s.clone()),
            Value::Object(m) => {
                let o = self.opts.element(path.to_string(), m);
                ChildSource::Definition(Box::new(parse_inner(&o, self.drivers, Some(self.common))?))
            }
            _ => return Err(QmpError::invalid_parameter_type(path, "BlockdevRef")),
        };
        Ok(ChildSpec { name, role, source })
    }

    /// Declares the required child `key` (QEMU: `bdrv_open_child`).
    pub fn child(&mut self, key: &str, role: ChildRole) -> Result<(), QmpError> {
        match self.opts.get(key) {
            None => Err(QmpError::missing_parameter(&self.opts.full_name(key))),
            Some(v) => {
                let c = self.child_from(&self.opts.full_name(key), key.to_string(), role, v)?;
                self.children.push(c);
                Ok(())
            }
        }
    }

    /// Declares the list of children `key`, named `key.0`, `key.1`, …;
    /// returns how many.
    pub fn child_list(&mut self, key: &str, role: ChildRole) -> Result<usize, QmpError> {
        let Some(items) = self.opts.opt_list(key)? else {
            return Err(QmpError::missing_parameter(&self.opts.full_name(key)));
        };
        let n = items.len();
        for (i, (path, v)) in items.into_iter().enumerate() {
            let c = self.child_from(&path, format!("{key}.{i}"), role, v)?;
            self.children.push(c);
        }
        Ok(n)
    }
}

const DISCARD: [&str; 2] = ["ignore", "unmap"];
const DETECT_ZEROES: [&str; 3] = ["off", "on", "unmap"];

/// Checks a `blockdev-add` argument object into a [`BlockdevSpec`].
pub fn parse_blockdev(opts: &Opts<'_>, drivers: &[DriverClass]) -> Result<BlockdevSpec, QmpError> {
    parse_inner(opts, drivers, None)
}

fn parse_inner(
    opts: &Opts<'_>,
    drivers: &[DriverClass],
    parent: Option<&NodeOptions>,
) -> Result<BlockdevSpec, QmpError> {
    let names: Vec<&str> = drivers.iter().map(|d| d.name).collect();
    let driver = opts.enum_str("driver", &names)?;
    let Some(class) = drivers.iter().find(|d| d.name == driver) else {
        return Err(QmpError::generic(format!(
            "Parameter 'driver' does not accept value '{driver}'"
        )));
    };
    let node_name = opts.opt_str("node-name")?.map(String::from);
    let discard = opts.opt_enum("discard", &DISCARD)?;
    let mut common = NodeOptions {
        discard_unmap: match discard {
            Some(d) => d == "unmap",
            None => parent.is_some(),
        },
        read_only: parent.is_some_and(|p| p.read_only),
        cache_direct: parent.is_some_and(|p| p.cache_direct),
        cache_no_flush: parent.is_some_and(|p| p.cache_no_flush),
        ..Default::default()
    };
    if let Some(cache) = opts.opt_obj("cache")? {
        if let Some(d) = cache.opt_bool("direct")? {
            common.cache_direct = d;
        }
        if let Some(n) = cache.opt_bool("no-flush")? {
            common.cache_no_flush = n;
        }
        cache.check_unexpected()?;
    }
    if let Some(ro) = opts.opt_bool("read-only")? {
        common.read_only = ro;
    }
    let _auto_read_only = opts.opt_bool("auto-read-only")?;
    let force_share = opts.bool_or("force-share", false)?;
    common.detect_zeroes = match opts.opt_enum("detect-zeroes", &DETECT_ZEROES)? {
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    let mut d = DriverOpts {
        opts,
        common: &common,
        drivers,
        children: Vec::new(),
    };
    let opener = (class.parse)(&mut d)?;
    let children = d.children;
    opts.check_unexpected()?;
    common.force_share = force_share;
    if force_share && !common.read_only {
        return Err(QmpError::generic(
            "force-share=on can only be used with read-only=on",
        ));
    }
    if common.detect_zeroes == DetectZeroes::Unmap && !common.discard_unmap {
        return Err(QmpError::generic(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    Ok(BlockdevSpec {
        node_name,
        driver: class.name,
        common,
        opener,
        children,
        options: opts.map().clone(),
    })
}

/// Opens a checked definition; the new node has refcount 1, owned by the
/// caller. On failure everything opened on the way is closed again.
pub fn open_blockdev(
    registry: Rc<Registry>,
    spec: BlockdevSpec,
) -> BoxFuture<'static, Result<Rc<Node>, String>> {
    Box::pin(async move {
        let mut children: Vec<NewChild> = Vec::new();
        let mut failure = None;
        for c in spec.children {
            match c.source {
                ChildSource::Reference(name) => match registry.lookup(Some(&name), Some(&name)) {
                    Ok(n) => {
                        n.ref_();
                        children.push((c.name, c.role, n));
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
                ChildSource::Definition(def) => match open_blockdev(registry.clone(), *def).await {
                    Ok(n) => children.push((c.name, c.role, n)),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                },
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => {
                let ctx = OpenCtx {
                    registry: &registry,
                    options: &spec.common,
                    children: &children,
                };
                match (spec.opener)(&ctx) {
                    Err(e) => Err(e),
                    Ok(driver) => registry
                        .open_node(
                            spec.node_name.as_deref(),
                            driver,
                            spec.common,
                            spec.options,
                            children.clone(),
                        )
                        .map_err(|e| e.to_string()),
                }
            }
        };
        match result {
            // The driver's own asynchronous open (QEMU: `drv->bdrv_open`
            // in a coroutine); on failure closing the node drops its edges.
            Ok(node) => match node.driver().open(&node).await {
                Ok(()) => Ok(node),
                Err(e) => {
                    unref(node).await;
                    Err(e)
                }
            },
            Err(e) => {
                for (_, _, c) in children.into_iter().rev() {
                    unref(c).await;
                }
                Err(e)
            }
        }
    })
}
