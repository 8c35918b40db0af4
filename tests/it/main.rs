//! Integration tests: one binary (one link step on a 2-core CI), the daemon in-process against
//! a fake API on 127.0.0.1, plus black-box runs of the real binary, and the fault suites of
//! `RELIABILITY.md`.

mod archive;
mod binary;
mod chaos;
mod cli;
mod clock;
mod control;
mod crash;
mod edges;
mod families;
mod faults_api;
mod faults_handler;
mod faults_store;
mod figures;
mod forward;
mod helpers;
mod hostile;
mod hostile_answers;
mod hostile_local;
mod layout;
mod metrics;
mod monitoring;
mod numbers;
mod polling;
mod postgres;
mod props;
mod proxy;
mod reload;
mod restart;
mod security;
mod systemd;
mod takeover;
mod timed_api;
