//! vblkcache: a vhost-user-blk daemon serving VM disks from an SSD cache in
//! front of a slow source image.
//!
//! Layers, bottom up: [`device`] (storage behind one trait), [`engine`] (the
//! block cache, which knows nothing of virtio), and the daemon on top.

pub mod control;
pub mod device;
pub mod engine;

// The daemon: command line, configuration, virtio-blk device and lifecycle.
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod sandbox;
pub mod size;
pub mod virtio;

pub use daemon::{run, Error};
