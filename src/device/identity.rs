//! Which source a device is, so that a cache does not serve (or write back)
//! the blocks of one disk as another's.
//!
//! A regular file is named by its inode and its modification time. A block
//! device has no useful inode (the node in /dev is made anew at every boot,
//! and `sdb` may be another disk after a reboot), so it is named by the
//! first stable identifier sysfs offers for it, read once when the device is
//! opened (later reads would be refused by the daemon's seccomp filter):
//!
//! | kind                    | identifier                                   |
//! |-------------------------|----------------------------------------------|
//! | device-mapper (LVM, dm-crypt, multipath) | `dm:` + `dm/uuid`           |
//! | md RAID                 | `md:` + `md/uuid`                            |
//! | loop device             | `loop:` + backing file's inode (or a backing block device's identifier), offset and size limit |
//! | NVMe namespace          | `wwid:` + `wwid`                             |
//! | SCSI/SATA disk          | `wwid:` + `device/wwid`                      |
//! | virtio-blk and others   | `serial:` + `serial` or `device/serial`      |
//! | partition of any above  | the disk's identifier + `/part<N>@<start sector>` |
//!
//! A block device that has none of these (a virtio disk without a serial, a
//! RAM disk) has no identifier. A cache that recorded one refuses, while it
//! holds dirty blocks, a device without one; between two devices without
//! one it can only check the size.
//!
//! Invariant: a block identifier is printable ASCII (other bytes are stored
//! as `?`) and at most [`MAX_BLOCK_ID`] bytes (a longer one is cut and ends
//! in a hash of the whole), so it fits the superblock and can be printed in
//! a one-line error as it is.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Longest block device identifier kept (longer ones are cut; no identifier
/// listed above comes near it).
pub const MAX_BLOCK_ID: usize = 240;

/// Which source a device is (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIdentity {
    /// A regular file: its inode number (stable across reboots on one
    /// filesystem; a copy or another file has another) and its modification
    /// time in nanoseconds since the epoch.
    File { ino: u64, mtime_ns: u64 },
    /// A block device and its stable identifier, `None` when sysfs has none.
    Block { id: Option<String> },
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceIdentity::File { ino, .. } => write!(f, "the regular file with inode {ino}"),
            DeviceIdentity::Block { id: Some(id) } => write!(f, "the block device {id}"),
            DeviceIdentity::Block { id: None } => {
                write!(f, "a block device without a stable identifier")
            }
        }
    }
}

/// The identifier of the block device numbered `rdev` (a `st_rdev`), from
/// `/sys/dev/block/MAJOR:MINOR`.
pub fn block_device_id(rdev: u64) -> Option<String> {
    id_of_rdev(rdev, 0)
}

/// Loop devices backed by loop devices, at most this deep.
const MAX_DEPTH: u32 = 8;

fn id_of_rdev(rdev: u64, depth: u32) -> Option<String> {
    let dir = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    id_at(Path::new(&dir), depth)
}

/// The identifier of the block device whose sysfs directory is `dir` (or a
/// link to it), following the table in the module documentation.
pub fn sysfs_id(dir: &Path) -> Option<String> {
    id_at(dir, 0)
}

fn id_at(dir: &Path, depth: u32) -> Option<String> {
    if depth > MAX_DEPTH {
        return None;
    }
    let dir = dir.canonicalize().ok()?;
    if let Some(n) = attr(&dir, "partition") {
        let start = attr(&dir, "start")?;
        let disk = id_at(dir.parent()?, depth)?;
        return Some(clip(format!("{disk}/part{n}@{start}")));
    }
    if let Some(u) = attr(&dir, "dm/uuid") {
        return Some(clip(format!("dm:{u}")));
    }
    if let Some(u) = attr(&dir, "md/uuid") {
        return Some(clip(format!("md:{u}")));
    }
    if let Some(path) = attr(&dir, "loop/backing_file") {
        // The backing file itself, not its name: a file put in its place
        // under the same name is another disk. Its inode, as for a file
        // source (the filesystem's device number may change at a reboot);
        // a block device behind it by its own identifier (a node's inode
        // on devtmpfs is new at every boot). A deleted backing file
        // ("... (deleted)") cannot be looked at: no identifier.
        let m = std::fs::metadata(&path).ok()?;
        let backing = if m.file_type().is_block_device() {
            id_of_rdev(m.rdev(), depth + 1)?
        } else {
            format!("ino={}", m.ino())
        };
        let offset = attr(&dir, "loop/offset").unwrap_or_else(|| String::from("0"));
        let limit = attr(&dir, "loop/sizelimit").unwrap_or_else(|| String::from("0"));
        return Some(clip(format!("loop:{backing}+{offset}+{limit}")));
    }
    for (name, kind) in [
        ("wwid", "wwid"),
        ("device/wwid", "wwid"),
        ("serial", "serial"),
        ("device/serial", "serial"),
    ] {
        if let Some(v) = attr(&dir, name) {
            return Some(clip(format!("{kind}:{v}")));
        }
    }
    None
}

/// One sysfs attribute, trimmed; `None` when it is missing or blank.
fn attr(dir: &Path, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(dir.join(name)).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Printable ASCII, at most [`MAX_BLOCK_ID`] bytes. A longer identifier
/// keeps its start and ends in `~` and a hash of the whole, so two long
/// identifiers that differ anywhere still differ.
fn clip(s: String) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if s.len() <= MAX_BLOCK_ID {
        return s;
    }
    // FNV-1a, 64 bits: stable across builds and machines.
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{}~{h:016x}", &s[..MAX_BLOCK_ID - 17])
}

/// True when `id` could have come from [`sysfs_id`]: what a superblock may
/// hold.
pub fn valid_block_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_BLOCK_ID && id.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn put(dir: &Path, name: &str, value: &str) {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(p, value).unwrap();
    }

    #[test]
    fn each_kind_of_device_is_named_by_its_first_identifier() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let dm = d.join("dm-0");
        put(&dm, "dm/uuid", "LVM-abc123\n");
        put(&dm, "dm/name", "vg-lv\n");
        assert_eq!(sysfs_id(&dm).as_deref(), Some("dm:LVM-abc123"));
        let md = d.join("md0");
        put(&md, "md/uuid", "1234:5678\n");
        assert_eq!(sysfs_id(&md).as_deref(), Some("md:1234:5678"));
        let nvme = d.join("nvme0n1");
        put(&nvme, "wwid", "eui.0025388b71b0e4a2\n");
        put(&nvme, "serial", "S4EWNX0R\n");
        assert_eq!(
            sysfs_id(&nvme).as_deref(),
            Some("wwid:eui.0025388b71b0e4a2")
        );
        let sda = d.join("sda");
        put(&sda, "device/wwid", "naa.5000c500a1b2c3d4\n");
        assert_eq!(sysfs_id(&sda).as_deref(), Some("wwid:naa.5000c500a1b2c3d4"));
        let vda = d.join("vda");
        put(&vda, "serial", "disk-7 \n");
        assert_eq!(sysfs_id(&vda).as_deref(), Some("serial:disk-7"));
    }

    #[test]
    fn a_partition_is_its_disk_plus_number_and_start() {
        let t = tempfile::tempdir().unwrap();
        let sda = t.path().join("sda");
        put(&sda, "device/wwid", "naa.1\n");
        let p2 = sda.join("sda2");
        put(&p2, "partition", "2\n");
        put(&p2, "start", "2048\n");
        assert_eq!(sysfs_id(&p2).as_deref(), Some("wwid:naa.1/part2@2048"));
        // Through a link, as /sys/dev/block/8:2 is.
        let link = t.path().join("8:2");
        std::os::unix::fs::symlink(&p2, &link).unwrap();
        assert_eq!(sysfs_id(&link).as_deref(), Some("wwid:naa.1/part2@2048"));
        // A partition of a disk without an identifier has none.
        let vdb = t.path().join("vdb");
        put(&vdb.join("vdb1"), "partition", "1\n");
        put(&vdb.join("vdb1"), "start", "2048\n");
        assert_eq!(sysfs_id(&vdb.join("vdb1")), None);
    }

    #[test]
    fn a_loop_device_is_named_by_its_backing_file_not_its_path() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        fs::write(&img, b"x").unwrap();
        let lo = t.path().join("loop0");
        put(&lo, "loop/backing_file", &format!("{}\n", img.display()));
        put(&lo, "loop/offset", "4096\n");
        let first = sysfs_id(&lo).unwrap();
        let m = fs::metadata(&img).unwrap();
        assert_eq!(first, format!("loop:ino={}+4096+0", m.ino()));
        // Another file (made while the first exists, so another inode) put
        // in its place under the same name.
        let other = t.path().join("other.img");
        fs::write(&other, b"x").unwrap();
        fs::rename(&other, &img).unwrap();
        assert_ne!(sysfs_id(&lo).unwrap(), first);
        // A deleted backing file leaves no identifier.
        put(
            &lo,
            "loop/backing_file",
            "/nonexistent/disk.img (deleted)\n",
        );
        assert_eq!(sysfs_id(&lo), None);
    }

    #[test]
    fn blank_or_missing_attributes_give_no_identifier() {
        let t = tempfile::tempdir().unwrap();
        let vda = t.path().join("vda");
        put(&vda, "serial", "  \n");
        put(&vda, "dm/uuid", "\n");
        assert_eq!(sysfs_id(&vda), None);
        assert_eq!(sysfs_id(&t.path().join("missing")), None);
    }

    #[test]
    fn identifiers_are_printable_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let sdz = t.path().join("sdz");
        put(
            &sdz,
            "device/wwid",
            &format!("t10.ATA  X\u{7}{}\n", "z".repeat(400)),
        );
        let id = sysfs_id(&sdz).unwrap();
        assert_eq!(id.len(), MAX_BLOCK_ID);
        assert!(id.starts_with("wwid:t10.ATA??X?zz"), "{id}");
        assert!(valid_block_id(id.as_bytes()));
        // Long identifiers that differ only past the cut still differ, and
        // so do the partitions of a disk whose identifier is that long.
        put(
            &sdz,
            "device/wwid",
            &format!("t10.ATA  X\u{7}{}y\n", "z".repeat(400)),
        );
        let other = sysfs_id(&sdz).unwrap();
        assert_eq!(other.len(), MAX_BLOCK_ID);
        assert_ne!(other, id);
        let parts: Vec<String> = (1..=2)
            .map(|n| {
                let p = sdz.join(format!("sdz{n}"));
                put(&p, "partition", &format!("{n}\n"));
                put(&p, "start", "2048\n");
                sysfs_id(&p).unwrap()
            })
            .collect();
        assert_ne!(parts[0], parts[1]);
        assert!(parts.iter().all(|p| valid_block_id(p.as_bytes())));
        assert!(!valid_block_id(b""));
        assert!(!valid_block_id(b"a b"));
        assert!(!valid_block_id(&[b'a'; MAX_BLOCK_ID + 1]));
    }
}
