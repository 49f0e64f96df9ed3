//! Session worker threads: one single-threaded tokio runtime per thread, sessions
//! assigned round-robin and never moved.
//!
//! A session is woken by its own thread's epoll and runs there, so the hot path
//! has no cross-thread task hand-off (no futex wake, no extra context switch);
//! on a small machine shared with Postgres and the clients, that is most of the
//! proxy's cost beyond the socket calls themselves.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    threads: Vec<(JoinHandle<()>, oneshot::Sender<()>)>,
}

impl Workers {
    pub fn start(n: usize) -> Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a session worker runtime")?;
            handles.push(rt.handle().clone());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("pgtier-worker-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                    // Remaining sessions are dropped with the runtime.
                    rt.shutdown_timeout(std::time::Duration::from_millis(100));
                })
                .context("cannot start a session worker thread")?;
            threads.push((thread, stop_tx));
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            threads,
        })
    }

    /// Run a session on the next worker.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(fut);
    }

    /// Run a task on every worker (e.g. to open per-thread connections).
    pub fn on_each<F, Fut>(&self, make: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for h in &self.handles {
            h.spawn(make());
        }
    }

    /// A handle for tasks that are not sessions (they may run on any worker).
    pub fn handle(&self) -> &Handle {
        &self.handles[0]
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stop every worker, dropping whatever sessions remain.
    pub fn shutdown(self) {
        for (thread, stop) in self.threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
