//! The qcow2 header (QEMU: `QCowHeader` in `block/qcow2.h`, parsed by
//! `qcow2_do_open`, extensions by `qcow2_read_extensions`).
//!
//! Versions 2 and 3; the three feature bitmaps (incompatible, compatible,
//! autoclear); the header extensions blockhaus understands (backing file
//! format, feature name table, external data file, bitmaps, full disk
//! encryption) and those it preserves untouched (any other). The header is
//! only ever rewritten field by field ([`field`]), as QEMU does for the dirty
//! bit, the L1 table and the refcount table, so extensions this code does not
//! know survive.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// `QCOW_MAGIC`: "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster (512 B, `MIN_CLUSTER_BITS`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster (2 MiB, `MAX_CLUSTER_BITS`).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header QEMU writes (with `compression_type`
/// and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// QEMU's `QCOW_MAX_L1_SIZE` (32 MiB of L1 table).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE` (8 MiB of refcount table).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name (1023 bytes).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits (`QCOW2_INCOMPAT_*`).
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts were in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is corrupt: never write.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-zlib compression type.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit this driver knows.
    pub const MASK: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits (`QCOW2_COMPAT_*`).
pub mod compat {
    /// Lazy refcounts may be used (blockhaus never postpones refcounts).
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (`QCOW2_AUTOCLEAR_*`).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types (`QCOW2_EXT_MAGIC_*`).
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO_HEADER: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Byte offsets of header fields that are rewritten in place.
pub mod field {
    /// `size` (8 bytes).
    pub const SIZE: u64 = 24;
    /// `l1_size` (4) followed by `l1_table_offset` (8).
    pub const L1: u64 = 36;
    /// `refcount_table_offset` (8) followed by `refcount_table_clusters` (4).
    pub const REFTABLE: u64 = 48;
    /// `incompatible_features` (8).
    pub const INCOMPAT: u64 = 72;
    /// `autoclear_features` (8).
    pub const AUTOCLEAR: u64 = 88;
}

/// Why a header was refused; the texts are QEMU's where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a qcow2 image.
    NotQcow2,
    /// Version other than 2 or 3.
    Version(u32),
    /// Cluster bits outside 9..=21.
    ClusterSize(u32),
    /// `header_length` too short or unaligned.
    TooShort,
    /// `header_length` beyond the first cluster.
    ExceedsCluster,
    /// Backing file name offset/size out of the first cluster.
    BackingName,
    /// A header extension runs past its area.
    Extension(u32),
    /// Unknown incompatible features, by name where the image names them.
    Unsupported(String),
    /// `refcount_order` above 6.
    RefcountOrder(u32),
    /// Encryption (AES or LUKS).
    Encrypted(u32),
    /// zstd or an unknown compression type.
    Compression(u8),
    /// Extended L2 entries need clusters of at least 16 KiB.
    ExtL2ClusterSize,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotQcow2 => f.write_str("Image is not in qcow2 format"),
            HeaderError::Version(v) => write!(f, "Unsupported qcow2 version {v}"),
            HeaderError::ClusterSize(b) => write!(f, "Unsupported cluster size: 2^{b}"),
            HeaderError::TooShort => f.write_str("qcow2 header too short"),
            HeaderError::ExceedsCluster => f.write_str("qcow2 header exceeds cluster size"),
            HeaderError::BackingName => f.write_str("Backing file name too long"),
            HeaderError::Extension(t) => write!(f, "Header extension too large (type {t:#x})"),
            HeaderError::Unsupported(s) => write!(f, "Unsupported qcow2 feature(s): {s}"),
            HeaderError::RefcountOrder(o) => {
                write!(
                    f,
                    "Reference count entry width too large; may not exceed 64 bits (order {o})"
                )
            }
            HeaderError::Encrypted(m) => write!(
                f,
                "Encrypted qcow2 images (crypt_method {m}) are not supported by blockhaus"
            ),
            HeaderError::Compression(1) => {
                f.write_str("Unsupported compression type 'zstd': blockhaus reads zlib only")
            }
            HeaderError::Compression(t) => write!(f, "Unknown compression type {t}"),
            HeaderError::ExtL2ClusterSize => f.write_str(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ),
        }
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// A parsed header with its extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible features (v3).
    pub incompatible: u64,
    /// Compatible features (v3).
    pub compatible: u64,
    /// Autoclear features (v3).
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format extension.
    pub backing_format: Option<String>,
    /// The external data file name extension.
    pub data_file: Option<String>,
    /// The feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps: bool,
    /// Every extension as found, in order (kept when the header is
    /// rewritten).
    pub extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether the image uses extended L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & incompat::EXTL2 != 0
    }

    /// The minimal part to read first: enough for every fixed field.
    pub const PROBE_LEN: usize = V3_HEADER_LEN as usize;

    /// Checks the fixed fields of `b` (at least [`Self::PROBE_LEN`] bytes)
    /// and returns the cluster size, so that the caller can read the first
    /// cluster for [`Header::parse`].
    pub fn probe(b: &[u8]) -> Result<u64, HeaderError> {
        if be32(b, 0) != MAGIC {
            return Err(HeaderError::NotQcow2);
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(HeaderError::ClusterSize(bits));
        }
        Ok(1 << bits)
    }

    /// Parses the header and its extensions from the first cluster `b`.
    pub fn parse(b: &[u8]) -> Result<Header, HeaderError> {
        let cs = Self::probe(b)?;
        let mut h = Header {
            version: be32(b, 4),
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            ..Default::default()
        };
        if h.version == 3 {
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(HeaderError::TooShort);
            }
            if u64::from(h.header_length) > cs {
                return Err(HeaderError::ExceedsCluster);
            }
            if h.header_length > 104 {
                h.compression_type = b.get(104).copied().unwrap_or(0);
            }
        }
        if h.backing_file_offset > cs
            || h.backing_file_size > MAX_BACKING_NAME
            || (h.backing_file_offset != 0
                && h.backing_file_offset + u64::from(h.backing_file_size) > cs)
        {
            return Err(HeaderError::BackingName);
        }
        // Extensions: from the end of the header to the backing file name
        // (or the end of the cluster).
        let end = if h.backing_file_offset != 0 {
            h.backing_file_offset as usize
        } else {
            cs as usize
        };
        let end = end.min(b.len());
        let mut at = h.header_length as usize;
        while at + 8 <= end {
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            at += 8;
            if kind == ext::END {
                break;
            }
            if len > end - at {
                return Err(HeaderError::Extension(kind));
            }
            let data = &b[at..at + len];
            h.extensions.push((kind, data.to_vec()));
            match kind {
                ext::BACKING_FORMAT => h.backing_format = Some(text(data)),
                ext::DATA_FILE => h.data_file = Some(text(data)),
                ext::BITMAPS => h.has_bitmaps = true,
                ext::FEATURE_TABLE => {
                    for e in data.as_chunks::<48>().0 {
                        let name = e[2..].split(|c| *c == 0).next().unwrap_or(&[]);
                        h.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: text(name),
                        });
                    }
                }
                _ => {}
            }
            at += len.div_ceil(8) * 8;
        }
        if h.backing_file_offset != 0 {
            let o = h.backing_file_offset as usize;
            let n = h.backing_file_size as usize;
            h.backing_file = b.get(o..o + n).map(text);
        }
        h.check_features()?;
        Ok(h)
    }

    /// Refuses what this driver cannot read (QEMU: `report_unsupported_feature`
    /// and the checks after it in `qcow2_do_open`).
    fn check_features(&self) -> Result<(), HeaderError> {
        let unknown = self.incompatible & !incompat::MASK;
        if unknown != 0 {
            let mut names: Vec<String> = Vec::new();
            for bit in 0..64u8 {
                if unknown & (1 << bit) == 0 {
                    continue;
                }
                match self
                    .feature_names
                    .iter()
                    .find(|f| f.kind == 0 && f.bit == bit)
                {
                    Some(f) => names.push(f.name.clone()),
                    None => names.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
                }
            }
            return Err(HeaderError::Unsupported(names.join(", ")));
        }
        if self.incompatible & incompat::DATA_FILE != 0 {
            return Err(HeaderError::Unsupported(String::from(
                "external data file (not supported by blockhaus)",
            )));
        }
        if self.refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(self.refcount_order));
        }
        if self.crypt_method != 0 {
            return Err(HeaderError::Encrypted(self.crypt_method));
        }
        let has_type_bit = self.incompatible & incompat::COMPRESSION != 0;
        if self.compression_type != 0 || has_type_bit {
            return Err(HeaderError::Compression(self.compression_type));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(HeaderError::ExtL2ClusterSize);
        }
        Ok(())
    }
}

/// The first cluster of `h`'s image with a new backing file name and
/// format (QEMU: `qcow2_change_backing_file` → `qcow2_update_header`):
/// the fixed header from `current`, every other extension as it was, the
/// backing format extension, the end marker, the name. `None` if it does
/// not fit in the cluster.
pub fn with_backing(
    h: &Header,
    current: &[u8],
    file: Option<&str>,
    format: Option<&str>,
) -> Option<Vec<u8>> {
    let mut exts: Vec<(u32, &[u8])> = h
        .extensions
        .iter()
        .filter(|(kind, _)| *kind != ext::BACKING_FORMAT)
        .map(|(kind, data)| (*kind, &data[..]))
        .collect();
    if let (Some(f), Some(_)) = (format, file) {
        exts.push((ext::BACKING_FORMAT, f.as_bytes()));
    }
    assemble(h, current, &exts, file)
}

/// The first cluster of `h`'s image with extension `kind` replaced by
/// `data` (`None`: removed), everything else as it was (QEMU:
/// `qcow2_update_header` after the bitmaps extension changed).
pub fn with_extension(
    h: &Header,
    current: &[u8],
    kind: u32,
    data: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let mut exts: Vec<(u32, &[u8])> = h
        .extensions
        .iter()
        .filter(|(k, _)| *k != kind)
        .map(|(k, d)| (*k, &d[..]))
        .collect();
    if let Some(d) = data {
        exts.push((kind, d));
    }
    assemble(h, current, &exts, h.backing_file.as_deref())
}

fn assemble(
    h: &Header,
    current: &[u8],
    exts: &[(u32, &[u8])],
    file: Option<&str>,
) -> Option<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    let mut b = current.get(..h.header_length as usize)?.to_vec();
    for (kind, data) in exts {
        put_ext(&mut b, *kind, data);
    }
    put32(&mut b, ext::END);
    put32(&mut b, 0);
    let (off, len) = match file {
        Some(name) if name.len() <= MAX_BACKING_NAME as usize => {
            let off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            (off, name.len() as u32)
        }
        Some(_) => return None,
        None => (0, 0),
    };
    b[8..16].copy_from_slice(&off.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    if b.len() > cs {
        return None;
    }
    b.resize(cs, 0);
    Some(b)
}

/// What [`build`] writes into a new image's first cluster.
pub struct NewHeader<'a> {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size (the caller grows the L1 table to fit it afterwards).
    pub size: u64,
    /// Refcount table offset (one cluster).
    pub refcount_table_offset: u64,
    /// 2 or 3.
    pub version: u32,
    /// Incompatible features (EXTL2).
    pub incompatible: u64,
    /// Compatible features (LAZY_REFCOUNTS).
    pub compatible: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Backing file name.
    pub backing_file: Option<&'a str>,
    /// Backing format.
    pub backing_format: Option<&'a str>,
}

/// QEMU's feature name table, as `qemu-img create` writes it.
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_ext(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    put32(b, kind);
    put32(b, data.len() as u32);
    b.extend_from_slice(data);
    while !b.len().is_multiple_of(8) {
        b.push(0);
    }
}

/// The first cluster of a new image (QEMU: `qcow2_co_create` then
/// `qcow2_update_header`): header, extensions, backing file name. The L1
/// table is empty (`l1_size` 0); `None` if it does not fit in a cluster.
pub fn build(n: &NewHeader<'_>) -> Option<Vec<u8>> {
    let cs = 1usize << n.cluster_bits;
    let mut b = Vec::with_capacity(cs);
    put32(&mut b, MAGIC);
    put32(&mut b, n.version);
    put64(&mut b, 0); // backing_file_offset, patched below
    put32(&mut b, 0); // backing_file_size
    put32(&mut b, n.cluster_bits);
    put64(&mut b, n.size);
    put32(&mut b, 0); // crypt_method
    put32(&mut b, 0); // l1_size
    put64(&mut b, 0); // l1_table_offset
    put64(&mut b, n.refcount_table_offset);
    put32(&mut b, 1); // refcount_table_clusters
    put32(&mut b, 0); // nb_snapshots
    put64(&mut b, 0); // snapshots_offset
    if n.version >= 3 {
        put64(&mut b, n.incompatible);
        put64(&mut b, n.compatible);
        put64(&mut b, 0); // autoclear
        put32(&mut b, n.refcount_order);
        put32(&mut b, V3_HEADER_LEN);
        b.resize(V3_HEADER_LEN as usize, 0); // compression_type 0 + padding
    }
    if let Some(f) = n.backing_format {
        put_ext(&mut b, ext::BACKING_FORMAT, f.as_bytes());
    }
    if n.version >= 3 {
        let mut t = Vec::new();
        for (kind, bit, name) in FEATURES {
            t.push(kind);
            t.push(bit);
            let mut nm = [0u8; 46];
            nm[..name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&nm);
        }
        put_ext(&mut b, ext::FEATURE_TABLE, &t);
    }
    put32(&mut b, ext::END);
    put32(&mut b, 0);
    if let Some(name) = n.backing_file {
        let off = b.len() as u64;
        b[8..16].copy_from_slice(&off.to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
    }
    if b.len() > cs {
        return None;
    }
    b.resize(cs, 0);
    Some(b)
}
