//! A test hook for the worst moments to be killed: with `KTO_TEST_PAUSE=NAME`, the process announces
//! `kto: paused at NAME` on stderr when it reaches the pause point NAME and waits there for ever, so a test can
//! SIGKILL it exactly there (in the final save, between deleting and moving files; in checkpoint rotation). Unset,
//! a pause point costs one environment look-up.

pub fn pause_point(name: &str) {
    if std::env::var("KTO_TEST_PAUSE").is_ok_and(|v| v == name) {
        eprintln!("kto: paused at {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
