//! The `kto` binary's parts, outside the library so that `kto` the library pulls in no command-line
//! dependencies (clap, indicatif, signal-hook, plotters: the `cli` feature): the commands (`cli`), `kto bench`,
//! `kto demo` and `kto plot`.
pub mod bench;
mod bench_generate;
pub mod cli;
pub mod demo;
pub mod plot;
