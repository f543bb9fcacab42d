//! Unit tests of stream detection, triggers and the readahead queue.

use super::*;

#[test]
fn a_miss_after_a_miss_starts_a_window_that_doubles_up_to_the_maximum() {
    let ra = ReadAhead::new(16);
    assert_eq!(ra.plan(100, 100), None, "a first miss only starts a stream");
    assert_eq!(
        ra.plan(101, 101),
        Some(Window {
            first: 102,
            count: 4
        })
    );
    // The stream now expects its miss past the window: 102..106 were
    // fetched ahead, so the next miss is at 106.
    assert_eq!(
        ra.plan(105, 105),
        None,
        "a miss inside the window is not the stream's"
    );
    assert_eq!(
        ra.plan(106, 107),
        Some(Window {
            first: 108,
            count: 8
        })
    );
    assert_eq!(ra.plan(116, 116).map(|j| j.count), Some(16));
    assert_eq!(ra.plan(133, 133).map(|j| j.count), Some(16), "capped");
}

#[test]
fn reaching_a_trigger_fires_the_next_window_once() {
    let ra = ReadAhead::new(16);
    assert_eq!(ra.plan(100, 100), None);
    assert_eq!(ra.plan(101, 101).map(|w| w.first), Some(102));
    assert_eq!(ra.fire(102, 102), None, "not armed before the claims");
    ra.arm(102, Some(102));
    assert_eq!(ra.fire(101, 101), None, "short of the trigger (102)");
    assert_eq!(ra.fire(0, 50), None, "elsewhere");
    assert_eq!(
        ra.fire(102, 102),
        Some(Window {
            first: 106,
            count: 8
        }),
        "the window after 102..106"
    );
    assert_eq!(ra.fire(102, 103), None, "fired once");
    // Blocks 106..108 were being read already: the trigger is 108.
    ra.arm(106, Some(108));
    assert_eq!(ra.fire(104, 107), None, "before the first claimed block");
    assert_eq!(
        ra.fire(108, 108),
        Some(Window {
            first: 114,
            count: 16
        }),
        "the first claimed block"
    );
    ra.arm(114, Some(114));
    assert_eq!(ra.plan(114, 114), None, "the stream expects 130 now");
    assert_eq!(
        ra.plan(130, 130).map(|w| (w.first, w.count)),
        Some((131, 16))
    );
    ra.arm(131, None);
    assert_eq!(ra.fire(131, 131), None, "nothing claimed: not armed");
    // Reads of 64 blocks or more skip the filter but still match exactly.
    assert_eq!(ra.plan(5000, 5000), None);
    assert_eq!(ra.plan(5001, 5001).map(|w| w.first), Some(5002));
    ra.arm(5002, Some(5002));
    assert_eq!(ra.fire(4000, 4999), None);
    assert_eq!(ra.fire(4000, 5002).map(|w| w.first), Some(5006));
}

#[test]
fn off_plans_nothing_and_unrelated_misses_do_not_trigger() {
    let off = ReadAhead::new(0);
    assert_eq!(off.plan(1, 1), None);
    assert_eq!(off.plan(2, 2), None);
    let ra = ReadAhead::new(8);
    for b in [10, 500, 42, 9000, 77] {
        assert_eq!(ra.plan(b, b), None, "random misses are no stream");
    }
    // Two interleaved streams are both followed.
    assert_eq!(ra.plan(1000, 1000), None);
    assert_eq!(ra.plan(5000, 5001), None);
    assert_eq!(ra.plan(1001, 1001).map(|j| j.first), Some(1002));
    assert_eq!(ra.plan(5002, 5002).map(|j| j.first), Some(5003));
}

#[test]
fn the_queue_is_bounded_and_close_gives_the_jobs_back() {
    let ra = ReadAhead::new(8);
    let job = |first| Job {
        first,
        frames: vec![first],
    };
    for i in 0..QUEUE_DEPTH as u64 {
        assert!(ra.has_room());
        assert!(ra.push(job(i)).is_none());
    }
    assert!(!ra.has_room());
    assert_eq!(
        ra.push(job(99)).map(|j| j.first),
        Some(99),
        "full: given back"
    );
    assert_eq!(ra.pop().map(|j| j.first), Some(0));
    ra.done();
    let left: Vec<u64> = ra.close().iter().map(|j| j.first).collect();
    assert_eq!(left, (1..QUEUE_DEPTH as u64).collect::<Vec<_>>());
    assert_eq!(
        ra.push(job(7)).map(|j| j.first),
        Some(7),
        "closed: given back"
    );
    assert!(ra.pop().is_none(), "workers exit once closed");
    ra.wait_idle();
}
