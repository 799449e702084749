//! How one [`Op`] becomes SCSI commands on a LUN: READ(16)/WRITE(16) split
//! at the transfer limit (FUA passed through), SYNCHRONIZE CACHE(10), UNMAP
//! or WRITE SAME(16) for discard and write-zeroes, split at their limits.
//! Pure and host-tested.

use super::cdb::{self, Cdb};
use crate::virtio::{Op, split};
use alloc::vec;
use alloc::vec::Vec;

/// Where a command's data goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    None,
    /// Device → bytes `[start, start + len)` of the request's buffer.
    In(usize, usize),
    /// Bytes `[start, start + len)` of the request's buffer → device.
    Out(usize, usize),
    /// Parameter data the driver made (UNMAP list, WRITE SAME block).
    OutOwned(Vec<u8>),
}

/// One SCSI command of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub cdb: Cdb,
    pub data: Data,
}

/// What a LUN supports, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub block_size: u32,
    pub max_transfer: u64,
    /// UNMAP supported, at most this many bytes per command (0: no UNMAP).
    pub max_unmap: u64,
    /// WRITE SAME(16) with the UNMAP bit is supported.
    pub write_same_unmap: bool,
    /// WRITE SAME(16) limit in bytes (0: no WRITE SAME).
    pub max_write_same: u64,
}

/// The commands for `op` (which passed `DiskInfo::check`).
pub fn plan(op: &Op, caps: &Caps) -> Vec<Command> {
    let bs = u64::from(caps.block_size.max(1));
    // One command moves at most u32::MAX blocks.
    let cap = |max: u64| max.min(u64::from(u32::MAX) * bs) / bs * bs;
    let rw = |offset: u64, len: u64, write: bool, fua: bool| {
        split(offset, len, cap(caps.max_transfer))
            .map(|(o, n)| {
                let (lba, blocks) = (o / bs, (n / bs) as u32);
                let range = ((o - offset) as usize, n as usize);
                if write {
                    Command {
                        cdb: cdb::write_16(lba, blocks, fua),
                        data: Data::Out(range.0, range.1),
                    }
                } else {
                    Command {
                        cdb: cdb::read_16(lba, blocks, false),
                        data: Data::In(range.0, range.1),
                    }
                }
            })
            .collect::<Vec<_>>()
    };
    let write_same = |offset: u64, len: u64, unmap: bool| {
        split(offset, len, cap(caps.max_write_same))
            .map(|(o, n)| Command {
                cdb: cdb::write_same_16(o / bs, (n / bs) as u32, unmap),
                data: Data::OutOwned(vec![0; bs as usize]),
            })
            .collect::<Vec<_>>()
    };
    match op {
        Op::Read { offset, buf } => rw(*offset, buf.len() as u64, false, false),
        Op::Write { offset, buf, fua } => rw(*offset, buf.len() as u64, true, *fua),
        Op::Flush => vec![Command {
            cdb: cdb::synchronize_cache_10(),
            data: Data::None,
        }],
        Op::Discard { offset, len } if caps.max_unmap > 0 => {
            split(*offset, *len, cap(caps.max_unmap))
                .map(|(o, n)| {
                    let params = cdb::unmap_parameters(&[(o / bs, (n / bs) as u32)]);
                    Command {
                        cdb: cdb::unmap(params.len() as u16),
                        data: Data::OutOwned(params),
                    }
                })
                .collect()
        }
        Op::Discard { offset, len } => write_same(*offset, *len, true),
        Op::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => write_same(*offset, *len, *may_unmap && caps.write_same_unmap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            block_size: 512,
            max_transfer: 8192,
            max_unmap: 4096,
            write_same_unmap: true,
            max_write_same: 1 << 20,
        }
    }

    #[test]
    fn reads_and_writes_split_with_fua_on_every_part() {
        let w = Op::Write {
            offset: 1024,
            buf: vec![0; 8192 + 1024],
            fua: true,
        };
        let cmds = plan(&w, &caps());
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].cdb, cdb::write_16(2, 16, true));
        assert_eq!(cmds[0].data, Data::Out(0, 8192));
        assert_eq!(cmds[1].cdb, cdb::write_16(18, 2, true));
        assert_eq!(cmds[1].data, Data::Out(8192, 1024));
        let r = Op::Read {
            offset: 0,
            buf: vec![0; 512],
        };
        assert_eq!(plan(&r, &caps())[0].data, Data::In(0, 512));
    }

    #[test]
    fn discard_uses_unmap_and_write_zeroes_write_same() {
        let cmds = plan(
            &Op::Discard {
                offset: 0,
                len: 6144,
            },
            &caps(),
        );
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].cdb, cdb::unmap(24));
        assert_eq!(
            cmds[1].data,
            Data::OutOwned(cdb::unmap_parameters(&[(8, 4)]))
        );
        let wz = plan(
            &Op::WriteZeroes {
                offset: 512,
                len: 1024,
                may_unmap: true,
            },
            &caps(),
        );
        assert_eq!(
            wz,
            vec![Command {
                cdb: cdb::write_same_16(1, 2, true),
                data: Data::OutOwned(vec![0; 512]),
            }]
        );
        let no_unmap = Caps {
            max_unmap: 0,
            ..caps()
        };
        assert_eq!(
            plan(
                &Op::Discard {
                    offset: 0,
                    len: 512
                },
                &no_unmap
            )[0]
            .cdb,
            cdb::write_same_16(0, 1, true)
        );
    }

    #[test]
    fn flush_is_synchronize_cache_10() {
        assert_eq!(plan(&Op::Flush, &caps())[0].cdb.as_bytes()[0], 0x35);
    }
}
