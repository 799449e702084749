//! User-creatable objects (QEMU: `qom/object_interfaces.c`, `object-add` /
//! `object-del`). blockhaus has three object types: `throttle-group`,
//! `tls-creds-x509` and `authz-simple` ([`crate::tls_creds`]).

use alloc::format;
use alloc::rc::Rc;
use core::any::Any;

use serde_json::{Value, json};

use crate::drivers::throttle_group::{ThrottleConfig, ThrottleGroup};
use crate::graph::registry::id_wellformed;
use crate::layer::BlockLayer;
use crate::options::Opts;
use crate::qmp::{Args, QmpError};
use crate::tls_creds::{self, AuthzSimple, TlsCredsX509};

type Res = Result<Value, QmpError>;

/// `object-add` (QEMU: `user_creatable_add_qapi`).
pub fn object_add(bl: &BlockLayer, args: &Args<'_>) -> Res {
    object_add_opts(bl, &Opts::new(args.map(), false))?;
    Ok(json!({}))
}

/// `object-add` from options read by `opts` (QMP, or `--object` in keyval
/// mode).
pub fn object_add_opts(bl: &BlockLayer, opts: &Opts<'_>) -> Result<(), QmpError> {
    let qom_type = opts.enum_str(
        "qom-type",
        &[
            "throttle-group",
            tls_creds::QOM_TYPE,
            tls_creds::AUTHZ_SIMPLE,
        ],
    )?;
    let id = opts.str("id")?;
    let reg = bl.registry();
    let wellformed = || {
        if id_wellformed(id) {
            Ok(())
        } else {
            Err(QmpError::invalid_parameter_value("id", "an identifier"))
        }
    };
    let obj: Rc<dyn Any> = if qom_type == tls_creds::QOM_TYPE {
        let creds = TlsCredsX509::parse(opts)?;
        wellformed()?;
        if let Some(check) = bl.tls_creds_check() {
            check(&creds).map_err(QmpError::generic)?;
        }
        Rc::new(creds)
    } else if qom_type == tls_creds::AUTHZ_SIMPLE {
        let authz = AuthzSimple::parse(opts)?;
        wellformed()?;
        Rc::new(authz)
    } else {
        let config = match opts.opt_obj("limits")? {
            Some(l) => ThrottleConfig::parse(&l)?,
            None => ThrottleConfig::default(),
        };
        opts.check_unexpected()?;
        wellformed()?;
        Rc::new(ThrottleGroup::new(
            id,
            config,
            reg.clock(),
            reg.executor().timers().clone(),
        ))
    };
    if !reg.add_object(id, obj) {
        return Err(QmpError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    Ok(())
}

/// `object-del` (QEMU: `user_creatable_del`).
pub fn object_del(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let id = args.str("id")?;
    args.check_known(&["id"])?;
    let reg = bl.registry();
    let Some(obj) = reg.object(id) else {
        return Err(QmpError::generic(format!("object '{id}' not found")));
    };
    if let Ok(g) = obj.downcast::<ThrottleGroup>()
        && g.members() > 0
    {
        return Err(QmpError::generic(format!(
            "object '{id}' is in use, can not be deleted"
        )));
    }
    reg.remove_object(id);
    Ok(json!({}))
}
