//! `--kill-node-every`: a task that SIGKILLs and restarts a CA node at a fixed interval.
//!
//! The restart runs on a blocking thread and holds the CA handle while it does. Aborting the
//! task would not stop that thread, so the handle could still be shared when the run ends and
//! the simulator wants it back to stop the CA and verify its store. [`Killer::stop`] instead
//! tells the task to stop and waits until a restart under way has finished and released the
//! handle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Something with nodes to kill and restart (the embedded CA).
pub trait Restart: Send + 'static {
    /// Kills one node and restarts it; returns its name.
    fn kill_and_restart(&mut self) -> Result<String, String>;
}

impl Restart for crate::embedded::EmbeddedCa {
    fn kill_and_restart(&mut self) -> Result<String, String> {
        crate::embedded::EmbeddedCa::kill_and_restart(self)
    }
}

pub struct Killer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Killer {
    /// Starts killing a node every `every` seconds (at least 0.1), the first after one interval.
    /// Each outcome is passed to `say`.
    pub fn start<R: Restart>(
        every: f64,
        ca: Arc<Mutex<R>>,
        say: impl Fn(String) + Send + 'static,
    ) -> Killer {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(every.max(0.1)));
            // Ticks missed during a restart are not made up in a burst.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                // The stop first: after a restart both may be ready, and an unbiased select
                // could start another restart after the stop was asked for.
                tokio::select! {
                    biased;
                    _ = stopped.changed() => return,
                    _ = tick.tick() => {}
                }
                if *stopped.borrow() {
                    return;
                }
                let ca = ca.clone();
                let r = tokio::task::spawn_blocking(move || match ca.lock() {
                    Ok(mut ca) => ca.kill_and_restart(),
                    Err(_) => Err("CA handle poisoned".to_string()),
                })
                .await;
                match r {
                    Ok(Ok(node)) => {
                        say(format!("CA node {node} killed with SIGKILL and restarted"))
                    }
                    Ok(Err(e)) => say(format!("CA restart failed: {e}")),
                    Err(_) => return,
                }
            }
        });
        Killer { stop, task }
    }

    /// Stops killing; returns once no restart is under way and the task has let go of the CA.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A restart that takes 300 ms, as a real one takes a moment to bind its ports again.
    struct Slow(Arc<AtomicU32>);
    impl Restart for Slow {
        fn kill_and_restart(&mut self) -> Result<String, String> {
            std::thread::sleep(Duration::from_millis(300));
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok("n1".into())
        }
    }

    /// The regression behind a CI failure ("the CA handle is still shared"): the run ended
    /// while a restart was under way, and the aborted killer's blocking thread still held the
    /// handle. Stopping must wait for that restart and leave the caller the only owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_during_a_restart_waits_for_it_and_releases_the_ca() {
        // Five times: when the restart ends, the stop and a missed tick are both ready, and a
        // killer that does not look at the stop first starts another restart half the time.
        for _ in 0..5 {
            let done = Arc::new(AtomicU32::new(0));
            let ca = Arc::new(Mutex::new(Slow(done.clone())));
            let killer = Killer::start(0.1, ca.clone(), |_| {});
            // The first restart starts at 100 ms and lasts until 400 ms: stop in its middle.
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert_eq!(
                done.load(Ordering::SeqCst),
                0,
                "the restart is still under way"
            );
            killer.stop().await;
            assert_eq!(
                done.load(Ordering::SeqCst),
                1,
                "the restart under way finished, and no other started"
            );
            assert!(
                Arc::try_unwrap(ca).is_ok(),
                "once stopped, the killer holds no copy of the CA handle"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_restart_is_reported_and_the_killer_goes_on() {
        struct Failing(Arc<AtomicU32>);
        impl Restart for Failing {
            fn kill_and_restart(&mut self) -> Result<String, String> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err("port taken".into())
            }
        }
        let tries = Arc::new(AtomicU32::new(0));
        let said = Arc::new(Mutex::new(Vec::new()));
        let log = said.clone();
        let killer = Killer::start(
            0.1,
            Arc::new(Mutex::new(Failing(tries.clone()))),
            move |m| log.lock().unwrap().push(m),
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        killer.stop().await;
        assert!(tries.load(Ordering::SeqCst) >= 2, "it kept trying");
        assert!(
            said.lock()
                .unwrap()
                .iter()
                .all(|m| m == "CA restart failed: port taken")
        );
    }
}
