//! Option haggling: the fixed newstyle handshake (QEMU:
//! `nbd_negotiate_options` in `nbd/server.c`).
//!
//! The greeting goes out when the [`Connection`] is made; then the client
//! flags, then options until `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` enters
//! transmission or `NBD_OPT_ABORT` ends the session. Unknown options are
//! skipped without being buffered and answered `NBD_REP_ERR_UNSUP`; known
//! options longer than [`super::Limits::max_option_len`] are skipped and
//! answered `NBD_REP_ERR_TOO_BIG`, so no client can make the engine hold
//! more than that. `NBD_OPT_EXPORT_NAME` has no error reply: every failure
//! there is a hard disconnect, as the spec requires.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::export::{Export, ExportSet};
use super::repr::{ClientOption, Info, InfoRequest, MetaContextRequest, OptionReply};
use super::request::MetaContext;
use super::server::{CloseReason, Connection, ProtocolError, Rx, State, Tls};
use super::wire::{
    self, client_flags, get_u32, get_u64, info, opt, option_header, rep, transmission_flags as tf,
};

/// The standard metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The id `NBD_OPT_SET_META_CONTEXT` gives `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The id of `qemu:allocation-depth`.
pub const ALLOCATION_DEPTH_ID: u32 = 2;

/// The id of the export's first `qemu:dirty-bitmap:*` context; bitmap
/// `i` of [`Export::bitmaps`] gets this plus `i` (QEMU's
/// `NBD_META_ID_DIRTY_BITMAP + i`).
pub const DIRTY_BITMAP_ID: u32 = 3;

/// The contexts `export` offers, with their ids, in the order replies
/// list them (QEMU: base, depth, then the bitmaps).
fn offered(export: &Export) -> Vec<(u32, MetaContext)> {
    let mut v = Vec::new();
    if export.features.block_status {
        v.push((BASE_ALLOCATION_ID, MetaContext::BaseAllocation));
    }
    if export.allocation_depth {
        v.push((ALLOCATION_DEPTH_ID, MetaContext::AllocationDepth));
    }
    for (i, b) in export.bitmaps.iter().enumerate() {
        v.push((
            DIRTY_BITMAP_ID + i as u32,
            MetaContext::DirtyBitmap(b.clone()),
        ));
    }
    v
}

/// Whether `query` names `ctx` (QEMU: `nbd_meta_base_query`,
/// `nbd_meta_qemu_query`): an exact name always; for
/// `NBD_OPT_LIST_META_CONTEXT` also the namespace (`base:`, `qemu:`) and
/// `qemu:dirty-bitmap:`.
fn matches(ctx: &MetaContext, query: &str, list: bool) -> bool {
    if query == ctx.name() {
        return true;
    }
    list && match ctx {
        MetaContext::BaseAllocation => query == "base:",
        MetaContext::AllocationDepth => query == "qemu:",
        MetaContext::DirtyBitmap(_) => query == "qemu:" || query == "qemu:dirty-bitmap:",
    }
}

impl Connection {
    /// The client flags arrived.
    pub(super) fn on_client_flags(&mut self) {
        let flags = get_u32(&self.hdr, 0..4);
        if flags & !client_flags::KNOWN != 0 {
            self.protocol_error(ProtocolError::UnknownClientFlags(flags));
            return;
        }
        self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
        self.rx = Rx::OptionHeader;
    }

    /// An option header arrived: decide whether to buffer or skip.
    pub(super) fn on_option_header(&mut self) {
        let magic = get_u64(&self.hdr, option_header::MAGIC);
        let option = get_u32(&self.hdr, option_header::OPTION);
        let len = get_u32(&self.hdr, option_header::LENGTH);
        if magic != wire::NBD_OPTS_MAGIC {
            self.protocol_error(ProtocolError::BadOptionMagic(magic));
            return;
        }
        self.options_seen = self.options_seen.saturating_add(1);
        if self.options_seen > self.limits.max_options {
            self.protocol_error(ProtocolError::TooManyOptions);
            return;
        }
        if self.tls == Tls::Required {
            self.option_before_tls(option, len);
        } else if !ClientOption::is_known(option) {
            self.skip_option(option, len, rep::ERR_UNSUP);
        } else if self.shutting_down && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                self.begin_close(CloseReason::Shutdown, false);
            } else {
                self.skip_option(option, len, rep::ERR_SHUTDOWN);
            }
        } else if len > self.limits.max_option_len {
            if option == opt::EXPORT_NAME {
                self.protocol_error(ProtocolError::BadExportName);
            } else {
                self.skip_option(option, len, rep::ERR_TOO_BIG);
            }
        } else {
            self.opt_buf.clear();
            self.opt_buf.reserve(len as usize);
            self.rx = Rx::OptionData {
                option,
                len: len as usize,
            };
        }
    }

    /// An option on a server that requires TLS, before TLS (QEMU:
    /// `nbd_negotiate_options` while `client->ioc` is the plain socket).
    fn option_before_tls(&mut self, option: u32, len: u32) {
        match option {
            opt::STARTTLS if len != 0 => {
                self.reply(
                    option,
                    OptionReply::Error {
                        code: rep::ERR_INVALID,
                        message: "option 'starttls' has unexpected length",
                    },
                );
                self.protocol_error(ProtocolError::StartTlsWithData);
            }
            opt::STARTTLS if self.shutting_down => self.option_error(option, rep::ERR_SHUTDOWN),
            opt::STARTTLS => {
                // The ACK is the last plain-text byte: what follows is
                // the client's TLS hello, for the host's TLS layer.
                self.reply(option, OptionReply::Ack);
                self.tls = Tls::Starting;
                self.rx = Rx::TlsSwitch;
            }
            opt::EXPORT_NAME => self.protocol_error(ProtocolError::NotBeforeTls(option)),
            // Everything else, known or not, ABORT included: skipped and
            // refused (then ABORT closes, see `option_error`).
            _ => self.skip_option(option, len, rep::ERR_TLS_REQD),
        }
    }

    /// Skip `len` bytes of option data, then answer with `reply`.
    fn skip_option(&mut self, option: u32, len: u32, reply: u32) {
        if len == 0 {
            self.option_error(option, reply);
        } else {
            self.rx = Rx::OptionSkip {
                option,
                left: u64::from(len),
                reply,
            };
        }
    }

    /// Send an error reply with QEMU-like text.
    pub(super) fn option_error(&mut self, option: u32, code: u32) {
        let message = match code {
            rep::ERR_UNSUP => format!("Unsupported option {option}"),
            rep::ERR_SHUTDOWN => String::from("Server shutting down"),
            rep::ERR_TOO_BIG => format!(
                "option {option} longer than {} bytes",
                self.limits.max_option_len
            ),
            rep::ERR_TLS_REQD => format!("Option 0x{option:x} not permitted before TLS"),
            _ => String::from("Invalid option"),
        };
        self.reply(
            option,
            OptionReply::Error {
                code,
                message: &message,
            },
        );
        if code == rep::ERR_TLS_REQD && option == opt::ABORT {
            // QEMU cannot ACK the abort once it refused it, and ends the
            // session all the same.
            self.begin_close(CloseReason::Abort, false);
        }
    }

    fn reply(&mut self, option: u32, reply: OptionReply<'_>) {
        self.out.write(|b| reply.emit(option, b));
    }

    /// The option's data is complete.
    pub(super) fn on_option(&mut self, option: u32, data: &[u8], exports: &dyn ExportSet) {
        let parsed = match ClientOption::parse(option, data) {
            Ok(o) => o,
            Err(e) => {
                if option == opt::EXPORT_NAME {
                    self.protocol_error(ProtocolError::BadExportName);
                } else {
                    self.reply(
                        option,
                        OptionReply::Error {
                            code: rep::ERR_INVALID,
                            message: e.message(),
                        },
                    );
                }
                return;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => self.export_name(name, exports),
            ClientOption::Abort => {
                self.reply(option, OptionReply::Ack);
                self.begin_close(CloseReason::Abort, false);
            }
            ClientOption::List => {
                exports.for_each(&mut |e: &Export| {
                    if e.name_is_valid() {
                        self.reply(
                            option,
                            OptionReply::Server {
                                name: &e.name,
                                description: &e.description,
                            },
                        );
                    }
                });
                self.reply(option, OptionReply::Ack);
            }
            // Before TLS on a TLS server, STARTTLS never gets here.
            ClientOption::StartTls if self.tls == Tls::Off => self.reply(
                option,
                OptionReply::Error {
                    code: rep::ERR_POLICY,
                    message: "TLS not configured",
                },
            ),
            ClientOption::StartTls => self.reply(
                option,
                OptionReply::Error {
                    code: rep::ERR_INVALID,
                    message: "TLS already enabled",
                },
            ),
            ClientOption::Info(req) => self.info_or_go(option, req, false, exports),
            ClientOption::Go(req) => self.info_or_go(option, req, true, exports),
            ClientOption::StructuredReply => {
                if self.extended {
                    self.reply(
                        option,
                        OptionReply::Error {
                            code: rep::ERR_EXT_HEADER_REQD,
                            message: "extended headers already negotiated",
                        },
                    );
                } else {
                    self.structured = true;
                    self.reply(option, OptionReply::Ack);
                }
            }
            ClientOption::ExtendedHeaders => {
                self.extended = true;
                self.structured = true;
                self.reply(option, OptionReply::Ack);
            }
            ClientOption::ListMetaContext(req) => self.meta_context(option, req, false, exports),
            ClientOption::SetMetaContext(req) => self.meta_context(option, req, true, exports),
            ClientOption::Unknown(_) => self.option_error(option, rep::ERR_UNSUP),
        }
    }

    /// The transmission flags `export` is served with on this connection.
    fn flags_for(&self, export: &Export, requested_name: &str) -> u16 {
        let mut f = export.transmission_flags();
        if self.structured {
            f |= tf::SEND_DF;
        }
        if self.extended && self.meta_export.as_deref() == Some(requested_name) {
            f |= tf::BLOCK_STATUS_PAYLOAD;
        }
        f
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`.
    fn info_or_go(&mut self, option: u32, req: InfoRequest<'_>, go: bool, exports: &dyn ExportSet) {
        let Some(export) = exports.find(req.name) else {
            let message = format!("export '{}' not present", req.name);
            self.reply(
                option,
                OptionReply::Error {
                    code: rep::ERR_UNKNOWN,
                    message: &message,
                },
            );
            return;
        };
        let flags = self.flags_for(&export, req.name);
        self.reply(
            option,
            OptionReply::Info(Info::Export {
                size: export.size,
                flags,
            }),
        );
        if req.wants(info::NAME) {
            self.reply(option, OptionReply::Info(Info::Name(&export.name)));
        }
        if req.wants(info::DESCRIPTION) && !export.description.is_empty() {
            self.reply(
                option,
                OptionReply::Info(Info::Description(&export.description)),
            );
        }
        // Like qemu-nbd, always tell the block sizes, asked or not; the
        // real minimum only to a client that asked for it (or to
        // NBD_OPT_INFO), 1 to one that will not obey it.
        let mut export = export;
        if go && !req.wants(info::BLOCK_SIZE) {
            export.block_size = export.block_size.without_minimum();
        }
        self.reply(
            option,
            OptionReply::Info(Info::BlockSize(export.block_size)),
        );
        self.reply(option, OptionReply::Ack);
        if go {
            let meta = self.meta_export.as_deref() == Some(req.name);
            self.enter_transmission(export, flags, meta);
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists.
    fn export_name(&mut self, name: &str, exports: &dyn ExportSet) {
        if self.extended {
            self.protocol_error(ProtocolError::ExportNameWithExtendedHeaders);
            return;
        }
        let Some(export) = exports.find(name) else {
            self.protocol_error(ProtocolError::UnknownExport(String::from(name)));
            return;
        };
        let flags = self.flags_for(&export, name);
        let no_zeroes = self.no_zeroes;
        // No block sizes are negotiated here: the client may send any
        // alignment (QEMU's back-compat minimum of 1).
        let mut export = export;
        export.block_size = export.block_size.without_minimum();
        self.out.write(|b| {
            b.extend_from_slice(&export.size.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            if !no_zeroes {
                b.extend_from_slice(&[0; wire::export_name_reply::ZEROES]);
            }
        });
        let meta = self.meta_export.as_deref() == Some(name);
        self.enter_transmission(export, flags, meta);
    }

    fn enter_transmission(&mut self, export: Export, flags: u16, meta: bool) {
        log::debug!(
            "nbd: serving export '{}' ({} bytes, flags 0x{flags:04x})",
            export.name,
            export.size
        );
        // The selection holds for the export it was made for, and only
        // for the contexts it still offers.
        self.contexts = if meta && self.structured {
            let now = offered(&export);
            self.meta_selected
                .iter()
                .filter(|c| now.contains(c))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        crate::trace!(
            nbd_negotiate_success,
            "Negotiation succeeded: export '{}', flags 0x{flags:04x}, structured {}, extended {}",
            export.name,
            self.structured,
            self.extended
        );
        self.flags = flags;
        self.export = Some(export);
        self.state = State::Transmission;
        self.rx = Rx::RequestHeader;
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(
        &mut self,
        option: u32,
        req: MetaContextRequest<'_>,
        set: bool,
        exports: &dyn ExportSet,
    ) {
        if set {
            // The selection is replaced even when this option fails.
            self.meta_export = None;
            self.meta_selected.clear();
        }
        if !self.structured {
            self.reply(
                option,
                OptionReply::Error {
                    code: rep::ERR_INVALID,
                    message: "request structured replies first",
                },
            );
            return;
        }
        let Some(export) = exports.find(req.name) else {
            let message = format!("export '{}' not present", req.name);
            self.reply(
                option,
                OptionReply::Error {
                    code: rep::ERR_UNKNOWN,
                    message: &message,
                },
            );
            return;
        };
        let list = !set;
        let selected: Vec<(u32, MetaContext)> = offered(&export)
            .into_iter()
            .filter(|(_, c)| (list && req.is_empty()) || req.queries().any(|q| matches(c, q, list)))
            .collect();
        for (id, c) in &selected {
            let name = c.name();
            self.reply(
                option,
                OptionReply::MetaContext {
                    id: if set { *id } else { 0 },
                    name: &name,
                },
            );
        }
        if set && !selected.is_empty() {
            self.meta_export = Some(String::from(req.name));
            self.meta_selected = selected;
        }
        self.reply(option, OptionReply::Ack);
    }
}
