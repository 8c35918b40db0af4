//! Integration tests: one binary (one link step on a 2-core CI), the daemon in-process against
//! a fake API on 127.0.0.1, plus black-box runs of the real binary.

mod cli;
mod control;
mod forward;
mod helpers;
mod polling;
mod restart;
mod systemd;
