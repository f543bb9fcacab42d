//! Tests of `FileDevice` on real files (buffered and O_DIRECT).

use super::*;

fn roundtrip(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
    let dev = match FileDevice::open(
        &path,
        OpenOptions {
            direct,
            read_only: false,
            exclusive: false,
        },
    ) {
        Ok(d) => d,
        // tmpfs refuses O_DIRECT: nothing to test there.
        Err(_) if direct => return,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(dev.size(), 64 * 1024);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    dev.write_at(&data, 1234).unwrap();
    let mut back = vec![0u8; 5000];
    dev.read_at(&mut back, 1234).unwrap();
    assert_eq!(back, data);
    let mut edge = [0u8; 10];
    dev.read_at(&mut edge, 1224).unwrap();
    assert_eq!(&edge, &[7u8; 10]);
    dev.write_zeroes(1234, 100).unwrap();
    dev.read_at(&mut back[..100], 1234).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0));
    dev.discard(8192, 8192).unwrap();
    let mut z = vec![1u8; 8192];
    dev.read_at(&mut z, 8192).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert!(dev.write_at(&[0u8; 2], 64 * 1024 - 1).is_err());
    dev.flush().unwrap();
}

/// `allocate` backs a hole with storage without changing a byte or the
/// size, and refuses a range outside the device.
#[test]
fn allocate_fills_holes_and_keeps_contents() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let dev = FileDevice::open(
        &path,
        OpenOptions {
            direct: false,
            read_only: false,
            exclusive: false,
        },
    )
    .unwrap();
    dev.write_at(&[9u8; 4096], 8192).unwrap();
    dev.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    assert!(before < 1024, "the file starts sparse ({before} sectors)");
    dev.allocate(0, 1 << 20).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.blocks() >= 2048,
        "1 MiB allocated ({} sectors)",
        meta.blocks()
    );
    assert_eq!(meta.len(), 1 << 20);
    let mut back = vec![1u8; 3 * 4096];
    dev.read_at(&mut back, 4096).unwrap();
    assert!(
        back[..4096].iter().all(|&b| b == 0),
        "a hole still reads zeros"
    );
    assert!(back[4096..8192].iter().all(|&b| b == 9), "data is kept");
    assert!(back[8192..].iter().all(|&b| b == 0));
    assert!(dev.allocate((1 << 20) - 4096, 8192).is_err());
}

/// A sparse file larger than the free space is left sparse: the hint
/// never fills the filesystem.
#[test]
fn allocate_refuses_more_than_half_the_free_space() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let f = std::fs::File::create(&path).unwrap();
    let dev = |size: u64| {
        f.set_len(size).ok()?;
        FileDevice::open(
            &path,
            OpenOptions {
                direct: false,
                read_only: false,
                exclusive: false,
            },
        )
        .ok()
    };
    let probe = dev(1 << 20).unwrap();
    let (_, free) = probe.space().unwrap();
    // Twice the free space, rounded to MiB (skipped where the
    // filesystem's largest file is smaller).
    let size = (free.saturating_mul(2) >> 20).max(1) << 20;
    let Some(big) = dev(size) else {
        eprintln!("skipping: cannot make a {size}-byte sparse file");
        return;
    };
    let err = big.allocate(0, size).unwrap_err();
    let why = std::error::Error::source(&err).map(|s| s.to_string());
    assert!(err.to_string().contains("allocate"), "{err}");
    assert!(
        why.as_deref().is_some_and(|w| w.contains("free")),
        "{why:?}"
    );
    assert!(
        std::fs::metadata(&path).unwrap().blocks() < 2048,
        "still sparse"
    );
}

#[test]
fn buffered_roundtrip() {
    roundtrip(false);
}

#[test]
fn direct_roundtrip() {
    roundtrip(true);
}

/// A file whose size is not a multiple of the direct-I/O alignment keeps
/// its size when its last partial sector is written (an aligned O_DIRECT
/// write there used to extend it, and the daemon then refused to start on
/// a source of another size).
#[test]
fn writing_the_tail_of_an_odd_sized_file_keeps_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let size = 100_001u64;
    std::fs::write(&path, vec![b'Z'; size as usize]).unwrap();
    let opts = OpenOptions {
        direct: true,
        read_only: false,
        exclusive: false,
    };
    let Ok(dev) = FileDevice::open(&path, opts) else {
        return; // tmpfs refuses O_DIRECT
    };
    let data = vec![0x5a ^ 0xff; 3000];
    dev.write_at(&data, size - 3000).unwrap();
    dev.write_at(&data[..512], 99_840 - 512).unwrap();
    dev.flush().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    let mut back = vec![0u8; 3000];
    dev.read_at(&mut back, size - 3000).unwrap();
    assert_eq!(back, data);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[(size - 3000) as usize..], &data[..]);
    assert_eq!(on_disk[(size - 3001) as usize], b'Z');
}

/// Threads writing their own small ranges of the same 4 KiB window at
/// once must all land. With O_DIRECT this used to lose writes: every
/// write below 4 KiB was a read-modify-write of the whole window, and
/// two of them in flight overwrote each other (a QEMU guest's fio verify
/// caught it). Sector writes now go straight to the file where the
/// device takes 512-byte direct I/O, and writes smaller than that are
/// serialised.
#[test]
fn concurrent_small_writes_in_one_window_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let Ok(dev) = FileDevice::open(
        &path,
        OpenOptions {
            direct: true,
            read_only: false,
            exclusive: false,
        },
    ) else {
        return; // no O_DIRECT here (tmpfs)
    };
    assert!(dev.direct_align().is_power_of_two() && dev.direct_align() <= 4096);
    let dev = std::sync::Arc::new(dev);
    // (bytes per write, distance between the threads' ranges)
    for (len, step) in [(512usize, 512u64), (100, 128)] {
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let dev = std::sync::Arc::clone(&dev);
                std::thread::spawn(move || {
                    for round in 0..200u32 {
                        let byte = t.wrapping_mul(31).wrapping_add(round as u8) | 1;
                        dev.write_at(&vec![byte; len], u64::from(t) * step).unwrap();
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 0).unwrap();
        for t in 0..8u8 {
            let want = t.wrapping_mul(31).wrapping_add(199) | 1;
            let at = (u64::from(t) * step) as usize;
            assert!(
                back[at..at + len].iter().all(|&b| b == want),
                "thread {t}'s last {len}-byte write was lost"
            );
        }
    }
}

#[test]
fn refuses_directories() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileDevice::open(dir.path(), OpenOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("open"), "{err}");
}
