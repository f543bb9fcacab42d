//! Busy polling (`--poll`) and stopping or disabling a queue while its
//! worker polls or is held inside a pass: what the worker may still write
//! into the ring, and that it always lets go.

use super::uring_tests::{direct_requests, file_guest, file_guest_polled, publish};
use super::*;
use std::sync::mpsc;

/// The used ring's flags word (VRING_USED_F_NO_NOTIFY = 1 asks for no kicks).
fn used_flags(g: &Guest) -> u16 {
    g.mem.read_obj(GuestAddress(used_ring(0))).unwrap()
}

/// With `--poll`, a request the driver publishes after the pass, with no
/// kick and no further call, is still served, with kicks suppressed while
/// polling and re-enabled afterwards. Without polling it waits for a kick.
#[test]
fn a_polled_queue_serves_requests_published_without_a_kick() {
    const POLL: Duration = Duration::from_millis(500);
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let Some((mut g, _dir)) = file_guest_polled(dir, direct, POLL) else {
            continue;
        };
        g.engine.write(8 * 512, &pattern(1)).unwrap();
        g.engine.write(16 * 512, &pattern(2)).unwrap();
        let (head_a, a) = g.publish_good_read(0, 8);
        let (backend, vring) = (g.backend.clone(), g.vrings[0].clone());
        let start = Instant::now();
        let poller = std::thread::spawn(move || {
            backend.process_queue(0, &vring).unwrap();
            start.elapsed()
        });
        assert!(
            wait_used(&g, 1, Duration::from_secs(5)),
            "direct={direct}: A"
        );
        assert_eq!(used_flags(&g), 1, "direct={direct}: kicks not suppressed");
        let b = Guest::slot(0, 0);
        g.mem
            .write_slice(&[0u8; 4096], GuestAddress(b.data))
            .unwrap();
        publish(&g, VIRTIO_BLK_T_IN, 16, &[(b.data, 4096)]);
        assert!(
            wait_used(&g, 2, Duration::from_secs(5)),
            "direct={direct}: B, published during the poll, was not served"
        );
        let polled_for = poller.join().unwrap();
        assert!(
            polled_for >= POLL,
            "direct={direct}: returned after {polled_for:?}"
        );
        assert_eq!(used_flags(&g), 0, "direct={direct}: kicks left disabled");
        assert_eq!(g.take_used(0), vec![(u32::from(head_a), 4097), (0, 4097)]);
        assert!(g.read_data(&a, 4096) == pattern(1), "direct={direct}");
        assert!(g.read_data(&b, 4096) == pattern(2), "direct={direct}");
        assert_eq!(g.status(b.status), OK);
        assert_eq!(direct_requests(&g), 2, "direct={direct}");
        assert!(g.backend.drain(Duration::from_secs(5)));
    }

    // The control: without polling, the same request waits for a kick.
    let Some((mut g, _dir)) = file_guest(false) else {
        unreachable!("buffered files always open")
    };
    g.engine.write(16 * 512, &pattern(2)).unwrap();
    g.run(0);
    let b = Guest::slot(0, 0);
    publish(&g, VIRTIO_BLK_T_IN, 16, &[(b.data, 4096)]);
    assert!(!wait_used(&g, 1, Duration::from_millis(100)));
    g.run(0);
    assert_eq!(g.take_used(0), vec![(0, 4097)]);
}

/// Starts a 500 ms poll session on a polled file guest after serving one
/// cached read, and returns once that read is on the used ring.
fn polling_guest(event_idx: bool) -> (Guest, tempfile::TempDir, std::thread::JoinHandle<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let (g, dir) = file_guest_polled(dir, false, Duration::from_millis(500)).unwrap();
    if event_idx {
        g.backend.set_event_idx(true);
        g.vrings[0].set_queue_event_idx(true);
    }
    g.engine.write(8 * 512, &pattern(1)).unwrap();
    g.engine.write(16 * 512, &pattern(2)).unwrap();
    g.publish_good_read(0, 8);
    let (backend, vring) = (g.backend.clone(), g.vrings[0].clone());
    let start = Instant::now();
    let poller = std::thread::spawn(move || {
        backend.process_queue(0, &vring).unwrap();
        start.elapsed()
    });
    assert!(wait_used(&g, 1, Duration::from_secs(5)));
    (g, dir, poller)
}

/// GET_VRING_BASE (queue marked not ready, then `stop_vring`) ends a poll
/// session: once `stop_vring` returns, the device writes nothing more into
/// the ring, neither the used flags nor (EVENT_IDX) `avail_event`, which
/// the front-end may already be handing to someone else.
#[test]
fn a_stopped_queue_is_left_alone_after_stop_vring() {
    for event_idx in [false, true] {
        let (g, _dir, poller) = polling_guest(event_idx);
        g.vrings[0].set_queue_ready(false);
        g.backend.stop_vring(0).unwrap();
        // The used flags word, or avail_event after the used ring's entries.
        let at = if event_idx {
            used_ring(0) + 4 + 8 * u64::from(QSIZE)
        } else {
            used_ring(0)
        };
        g.mem.write_obj(0xabcd_u16, GuestAddress(at)).unwrap();
        let polled_for = poller.join().unwrap();
        let after: u16 = g.mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(
            after, 0xabcd,
            "event_idx={event_idx}: the ring was written after stop_vring returned"
        );
        assert!(
            polled_for < Duration::from_millis(450),
            "event_idx={event_idx}: the poll went on for {polled_for:?} on a stopped queue"
        );
    }
}

/// SET_VRING_ENABLE(0) ends a poll session too, and a request published on
/// the disabled ring waits until it is enabled again.
#[test]
fn a_disabled_queue_is_not_served_by_the_poll() {
    let (mut g, _dir, poller) = polling_guest(false);
    g.vrings[0].set_enabled(false);
    let b = Guest::slot(0, 0);
    publish(&g, VIRTIO_BLK_T_IN, 16, &[(b.data, 4096)]);
    assert!(
        !wait_used(&g, 2, Duration::from_millis(200)),
        "a request on a disabled ring was served"
    );
    let polled_for = poller.join().unwrap();
    assert!(
        polled_for < Duration::from_millis(450),
        "the poll went on for {polled_for:?} on a disabled queue"
    );
    g.run(0);
    assert!(!wait_used(&g, 2, Duration::from_millis(50)));
    g.vrings[0].set_enabled(true);
    g.run(0);
    assert!(wait_used(&g, 2, Duration::from_secs(5)));
    assert_eq!(g.take_used(0).len(), 2);
    assert!(g.read_data(&b, 4096) == pattern(2));
}

/// A kick that finds nothing new (with EVENT_IDX the driver kicks once
/// during a poll session, for a request the poll already served) starts no
/// idle poll session: the worker goes back to sleep at once.
#[test]
fn a_kick_with_nothing_to_serve_starts_no_poll_session() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _dir) = file_guest_polled(dir, false, Duration::from_millis(500)).unwrap();
    let start = Instant::now();
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(300),
        "an empty kick polled for {took:?}"
    );
    // The control: a kick that finds a request polls for the interval.
    g.engine.write(8 * 512, &pattern(1)).unwrap();
    g.publish_good_read(0, 8);
    let start = Instant::now();
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "polled for {took:?} only"
    );
    assert!(wait_used(&g, 1, Duration::from_secs(1)));
}

/// Waits up to `limit` for queue 0's used flags word to equal `want`.
fn wait_flags(g: &Guest, want: u16, limit: Duration) -> bool {
    wait_until(limit, || used_flags(g) == want)
}

/// Without EVENT_IDX, a poll session sets VRING_USED_F_NO_NOTIFY. When the
/// session is cut short by SET_VRING_ENABLE 0 or GET_VRING_BASE, the flag is
/// left in guest memory. When the queue is live again and nothing is
/// published, the library's one pass (`vrings_with_pending_events` →
/// process_queue) must let the driver kick again. Otherwise the driver's
/// next request is never kicked and never polled: the queue hangs.
#[test]
fn kicks_are_allowed_again_when_a_polled_queue_comes_back() {
    // (a) SET_VRING_ENABLE 0 during a poll session, then 1 with nothing new.
    {
        let (g, _dir, poller) = polling_guest(false);
        assert!(
            wait_flags(&g, 1, Duration::from_secs(5)),
            "the poll did not suppress kicks"
        );
        g.vrings[0].set_enabled(false);
        poller.join().unwrap();
        g.vrings[0].set_enabled(true);
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        assert_eq!(
            used_flags(&g),
            0,
            "re-enabled: NO_NOTIFY left set on a live, idle queue"
        );
    }
    // (b) GET_VRING_BASE during a poll session, then the ring restarted
    // (SET_VRING_KICK marks it ready again; the VM's ring memory is as the
    // stopped daemon left it, e.g. after stop/cont).
    {
        let (g, _dir, poller) = polling_guest(false);
        assert!(wait_flags(&g, 1, Duration::from_secs(5)));
        g.vrings[0].set_queue_ready(false);
        g.backend.stop_vring(0).unwrap();
        poller.join().unwrap();
        g.vrings[0].set_queue_ready(true);
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        assert_eq!(used_flags(&g), 0, "restarted: NO_NOTIFY left set");
    }
    // (c) A fresh backend on a ring whose flags a previous daemon left at
    // NO_NOTIFY (migration destination, daemon restart/reconnect). A fix
    // that only remembers "I muted this queue" passes (a) and (b) but fails
    // this one.
    {
        let dir = tempfile::tempdir().unwrap();
        let (g, _dir) = file_guest_polled(dir, false, Duration::from_millis(500)).unwrap();
        g.mem.write_obj(1u16, GuestAddress(used_ring(0))).unwrap();
        g.backend.process_queue(0, &g.vrings[0]).unwrap();
        assert_eq!(used_flags(&g), 0, "fresh start: inherited NO_NOTIFY kept");
    }
}

/// A one-queue EVENT_IDX guest whose reads take `lat` (no io_uring: every
/// request goes to the pool). The worker pops a ring's worth of copies of one
/// read and stays inside `serve` under the in-flight bound. Then one more
/// copy is published, so a chain is still on the available ring. Returns the
/// guest, the worker thread and a receiver that is told when process_queue
/// returns.
fn worker_parked_with_a_chain_left(
    lat: Duration,
) -> (Guest, std::thread::JoinHandle<()>, mpsc::Receiver<()>) {
    let g = Guest::with_read_latency(1, limits(), lat);
    g.backend.set_event_idx(true);
    g.vrings[0].set_queue_event_idx(true);
    let s = Guest::slot(0, 0);
    g.header(s.hdr, VIRTIO_BLK_T_IN, 0);
    let head = g.chain(0, 0, &[(s.hdr, 16, 0), (s.data, 512, W), (s.status, 1, W)]);
    for _ in 0..QSIZE {
        g.publish(0, head);
    }
    let (backend, vring) = (g.backend.clone(), g.vrings[0].clone());
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        backend.process_queue(0, &vring).unwrap();
        let _ = tx.send(());
    });
    let popped_all = wait_until(Duration::from_secs(5), || {
        g.backend.inner.inflight[0].count() >= usize::from(QSIZE)
    });
    assert!(popped_all, "the worker did not pop a ring's worth");
    // One more chain (avail_idx - next_avail = 1): the worker, held by the
    // bound, cannot pop it until a read completes (`lat` from now).
    g.publish(0, head);
    (g, worker, rx)
}

/// EVENT_IDX: the queue is disabled (SET_VRING_ENABLE 0, which QEMU sends
/// before GET_VRING_BASE) while the worker is inside `serve` and a chain is
/// still published. `pop` refuses a disabled queue, and virtio-queue's
/// `enable_notification()` re-checks `avail_idx != next_avail` without
/// looking at the enabled flag: a `serve` that re-armed on a disabled queue
/// would loop forever, rewriting avail_event on every turn. It must return.
#[test]
fn a_queue_disabled_mid_pass_lets_the_worker_go() {
    let (g, worker, rx) = worker_parked_with_a_chain_left(Duration::from_millis(200));
    g.vrings[0].set_enabled(false);
    let returned = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    // Let a spinning worker out (it pops the chain and leaves), so that the
    // test ends either way.
    g.vrings[0].set_enabled(true);
    worker.join().unwrap();
    assert!(g.backend.drain(Duration::from_secs(20)));
    assert!(
        returned,
        "process_queue kept looping on a disabled queue with a chain published"
    );
}

/// The same through GET_VRING_BASE (queue marked not ready, then
/// stop_vring): with a worker spinning there, stop_vring would wait up to
/// DRAIN_TIMEOUT (60 s) for it to leave. Expected: it returns once the
/// in-flight reads are done (about 16 x 200 ms / 2 pool threads).
#[test]
fn stop_vring_returns_when_chains_are_left_unpopped() {
    let (g, worker, _rx) = worker_parked_with_a_chain_left(Duration::from_millis(200));
    g.vrings[0].set_queue_ready(false);
    let backend = g.backend.clone();
    let (tx, rx) = mpsc::channel();
    let stopper = std::thread::spawn(move || {
        backend.stop_vring(0).unwrap();
        let _ = tx.send(());
    });
    let stopped = rx.recv_timeout(Duration::from_secs(10)).is_ok();
    // Let a spinning worker out so that both threads end.
    g.vrings[0].set_queue_ready(true);
    worker.join().unwrap();
    stopper.join().unwrap();
    assert!(g.backend.drain(Duration::from_secs(20)));
    assert!(
        stopped,
        "stop_vring still waiting after 10 s: the worker never left the stopped queue"
    );
}
