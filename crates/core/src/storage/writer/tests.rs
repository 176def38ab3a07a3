//! When a commit skips the writer's queue (`queue.rs`), and that the order, the grouping
//! and the refusal after close hold either way.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::{self, ThreadId};
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::Durability;
use crate::storage::store::{ActorRecord, Store};
use crate::storage::writer::{CreateMode, Release, Writer, WriterHandle, Writes};

/// A store in a new temp dir with `relaxed` durability, its writer, and one actor row.
async fn writer_with_actor(dir: &tempfile::TempDir) -> (Arc<Store>, Writer, WriterHandle) {
    writer_with_actor_at(dir, Durability::Relaxed).await
}

/// A store in a new temp dir with `durability`, its writer, and one actor row.
async fn writer_with_actor_at(
    dir: &tempfile::TempDir,
    durability: Durability,
) -> (Arc<Store>, Writer, WriterHandle) {
    let store = Store::open(dir.path(), durability).unwrap();
    let writer = Writer::start(&store, None).unwrap();
    let handle = writer.handle();
    let record = ActorRecord {
        id: "a1".into(),
        name: "counter".into(),
        key: "k".into(),
    };
    handle
        .create_actor(record, None, CreateMode::GetOrCreate)
        .await
        .unwrap();
    (store, writer, handle)
}

fn state(byte: u8) -> Option<Box<Writes>> {
    Some(Box::new(Writes {
        state: Some(vec![byte]),
        ..Writes::default()
    }))
}

/// A release that notes which op it was and on which thread it ran.
fn noting(log: &Arc<Mutex<Vec<(u8, ThreadId)>>>, op: u8) -> Release {
    let log = log.clone();
    Box::new(move |result| {
        result.unwrap();
        log.lock().push((op, thread::current().id()));
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_commits_on_the_senders_thread_before_commit_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer, handle) = writer_with_actor(&dir).await;
    let transactions = writer.stats().transactions.load(Ordering::Relaxed);
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    handle.commit("a1".into(), state(7), None, noting(&log, 1), false);
    // Released already, here: durable before `commit` returned.
    assert_eq!(*log.lock(), vec![(1, thread::current().id())]);
    assert_eq!(
        writer.stats().transactions.load(Ordering::Relaxed),
        transactions + 1
    );
    assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![7]));
    writer.close().await;
}

/// A burst of commits 1 to 4 held at its start: commit 1 is applied inline on a thread of its
/// own (`first`, which returns its id, `inline_thread`), whose release holds the writer until
/// `go` is sent, and 2 to 4 are sent while it is.
struct Burst {
    first: thread::JoinHandle<ThreadId>,
    inline_thread: ThreadId,
    go: mpsc::Sender<()>,
}

fn burst(handle: &WriterHandle, log: &Arc<Mutex<Vec<(u8, ThreadId)>>>) -> Burst {
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let first = {
        let (handle, log) = (handle.clone(), log.clone());
        thread::spawn(move || {
            let release = noting(&log, 1);
            handle.commit(
                "a1".into(),
                state(1),
                None,
                Box::new(move |result| {
                    started_tx.send(thread::current().id()).unwrap();
                    go_rx.recv().unwrap();
                    release(result);
                }),
                false,
            );
            thread::current().id()
        })
    };
    let inline_thread = started.recv().unwrap();
    for op in 2..=4 {
        handle.commit("a1".into(), state(op), None, noting(log, op), false);
    }
    Burst {
        first,
        inline_thread,
        go,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_sent_while_one_is_applied_inline_are_grouped_and_released_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer, handle) = writer_with_actor(&dir).await;
    let transactions = writer.stats().transactions.load(Ordering::Relaxed);
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    let Burst {
        first,
        inline_thread,
        go,
    } = burst(&handle, &log);
    // Queued behind the first: none released yet, on any thread.
    assert!(log.lock().is_empty());
    go.send(()).unwrap();
    assert_eq!(first.join().unwrap(), inline_thread);
    handle.flush().await.unwrap();
    let log = log.lock().clone();
    let order: Vec<u8> = log.iter().map(|(op, _)| *op).collect();
    assert_eq!(order, vec![1, 2, 3, 4]);
    assert_eq!(log[0].1, inline_thread);
    let main = thread::current().id();
    for (_, thread) in &log[1..] {
        assert_ne!(*thread, inline_thread);
        assert_ne!(*thread, main);
    }
    assert_eq!(log[1].1, log[3].1, "the queued commits share one batch");
    // The inline commit, then one transaction for the three queued ones.
    assert_eq!(
        writer.stats().transactions.load(Ordering::Relaxed),
        transactions + 2
    );
    assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![4]));
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_right_after_a_long_batch_goes_to_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor(&dir).await;
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    let slow = noting(&log, 1);
    // A batch that takes 200 ms (its release stands in for a slow disk): the writer was
    // busy nearly all of the time since, so the next commit is queued, not applied here.
    handle.commit(
        "a1".into(),
        state(1),
        None,
        Box::new(move |result| {
            thread::sleep(Duration::from_millis(200));
            slow(result);
        }),
        false,
    );
    // The first was applied (and released) before its commit returned.
    assert_eq!(log.lock().len(), 1);
    handle.commit("a1".into(), state(2), None, noting(&log, 2), false);
    // The second is queued: the writer thread may already have applied it by now, so which
    // thread applied it is what tells (below), not whether it is done yet.
    handle.flush().await.unwrap();
    let log = log.lock().clone();
    assert_eq!(log[0].1, thread::current().id());
    assert_eq!(log[1].0, 2);
    assert_ne!(log[1].1, thread::current().id());
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_close_commits_are_refused_with_writer_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor(&dir).await;
    writer.close().await;
    handle.shared_queue().forget_last_batch();
    let (tx, rx) = mpsc::channel();
    handle.commit(
        "a1".into(),
        state(1),
        None,
        Box::new(move |result| tx.send(result.unwrap_err().code().to_string()).unwrap()),
        false,
    );
    assert_eq!(rx.try_recv().unwrap(), "writer_closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_next_commit_queues_even_after_a_pause() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor(&dir).await;
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    // A burst, as many actors with a call in flight each send one.
    let Burst { first, go, .. } = burst(&handle, &log);
    go.send(()).unwrap();
    first.join().unwrap();
    handle.shared_queue().wait_idle();
    // Idle for far longer than the last batch took, which alone would let the next commit
    // be applied here; but that batch was part of a burst, so it queues.
    thread::sleep(Duration::from_millis(200));
    handle.commit("a1".into(), state(5), None, noting(&log, 5), false);
    handle.shared_queue().wait_idle();
    // That one was alone on the writer thread, so the next, after a pause, skips the queue.
    thread::sleep(Duration::from_millis(200));
    handle.commit("a1".into(), state(6), None, noting(&log, 6), false);
    let log = log.lock().clone();
    let order: Vec<u8> = log.iter().map(|(op, _)| *op).collect();
    assert_eq!(order, (1..=6).collect::<Vec<u8>>());
    let here = thread::current().id();
    assert_ne!(
        log[4].1, here,
        "the commit after the burst went to the writer thread"
    );
    assert_eq!(
        log[5].1, here,
        "the one after a lone commit was applied inline"
    );
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_come_slower_than_a_batch_takes_keep_skipping_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor(&dir).await;
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    // One actor's calls one at a time: each commit is sent well after the one before was
    // released, as a sequential client's are.
    for op in 1..=5 {
        handle.commit("a1".into(), state(op), None, noting(&log, op), false);
        thread::sleep(Duration::from_millis(100));
    }
    let log = log.lock().clone();
    assert_eq!(log.len(), 5, "each was released before its commit returned");
    for (op, thread) in &log {
        assert_eq!(
            *thread,
            thread::current().id(),
            "commit {op} was applied inline"
        );
    }
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_full_durability_only_an_alone_actors_next_commit_skips_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer, handle) = writer_with_actor_at(&dir, Durability::Full).await;
    handle
        .create_actor(record("a2", "k2"), None, CreateMode::GetOrCreate)
        .await
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    // Each commit finds the writer idle after a fast lone batch: under `relaxed` every one of
    // them would be applied here. Under `full` its flush would hold this thread (a tokio
    // worker, for an actor), so only a commit whose sender is alone, of the actor whose commit
    // was sent last (one actor called one call at a time), is applied here.
    let send = |op: u8, actor: &str, alone: bool| {
        handle.shared_queue().forget_last_batch();
        handle.commit(actor.into(), state(op), None, noting(&log, op), alone);
        handle.shared_queue().wait_idle();
    };
    send(1, "a1", true); // the first commit since a creation
    send(2, "a1", true);
    send(3, "a1", false); // another actor has a call in progress
    send(4, "a1", true);
    send(5, "a2", true); // another actor's commit was sent last
    send(6, "a2", true);
    let here = thread::current().id();
    let applied_here: Vec<(u8, bool)> = log
        .lock()
        .iter()
        .map(|(op, thread)| (*op, *thread == here))
        .collect();
    assert_eq!(
        applied_here,
        [
            (1, false),
            (2, true),
            (3, false),
            (4, true),
            (5, false),
            (6, true)
        ]
    );
    assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![4]));
    assert_eq!(store.load("a2").unwrap().unwrap().state, Some(vec![6]));
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_full_durability_a_commit_after_a_slow_flush_goes_to_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor_at(&dir, Durability::Full).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    handle.commit("a1".into(), state(1), None, noting(&log, 1), true);
    handle.shared_queue().wait_idle();
    // A batch that takes 5 ms (its release stands in for a slow disk's flush), longer than
    // an inline commit may hold its thread.
    let slow = noting(&log, 2);
    handle.shared_queue().forget_last_batch();
    handle.commit(
        "a1".into(),
        state(2),
        None,
        Box::new(move |result| {
            thread::sleep(Duration::from_millis(5));
            slow(result);
        }),
        true,
    );
    handle.shared_queue().wait_idle();
    handle.commit("a1".into(), state(3), None, noting(&log, 3), true);
    handle.shared_queue().wait_idle();
    let here = thread::current().id();
    let log = log.lock().clone();
    assert_eq!(log.iter().map(|(op, _)| *op).collect::<Vec<_>>(), [1, 2, 3]);
    // The second was applied here (a fast last batch, the same actor, alone); the third,
    // after its 5 ms, went to the writer thread.
    assert_eq!(log[1].1, here);
    assert_ne!(log[2].1, here);
    // ...and is counted as sent there for that reason alone.
    assert_eq!(writer.stats().slow.load(Ordering::Relaxed), 1);
    writer.close().await;
}

fn record(id: &str, key: &str) -> ActorRecord {
    ActorRecord {
        id: id.into(),
        name: "counter".into(),
        key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_whose_key_has_a_row_is_answered_without_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, writer, handle) = writer_with_actor_at(&dir, Durability::Full).await;
    let transactions = writer.stats().transactions.load(Ordering::Relaxed);
    let (found, created) = handle
        .create_actor(record("a2", "k"), None, CreateMode::GetOrCreate)
        .await
        .unwrap();
    assert_eq!((found.id.as_str(), created), ("a1", false));
    let err = handle
        .create_actor(record("a3", "k"), None, CreateMode::Create)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "already_exists");
    assert_eq!(
        writer.stats().transactions.load(Ordering::Relaxed),
        transactions,
        "neither needed a commit"
    );
    let (made, created) = handle
        .create_actor(record("a4", "other"), None, CreateMode::GetOrCreate)
        .await
        .unwrap();
    assert_eq!((made.id.as_str(), created), ("a4", true));
    assert_eq!(
        writer.stats().transactions.load(Ordering::Relaxed),
        transactions + 1
    );
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_batched_behind_the_delete_of_its_key_makes_a_new_row() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer, handle) = writer_with_actor(&dir).await;
    handle.shared_queue().forget_last_batch();
    let log = Arc::new(Mutex::new(Vec::new()));
    let Burst { first, go, .. } = burst(&handle, &log);
    // Both queue behind the held commit, so they are applied as one batch.
    let (deleted_tx, deleted) = mpsc::channel();
    handle
        .send(super::WriteOp::DeleteActor {
            actor_id: "a1".into(),
            release: Box::new(move |result| deleted_tx.send(result.is_ok()).unwrap()),
        })
        .unwrap();
    let (reply, created) = tokio::sync::oneshot::channel();
    handle
        .send(super::WriteOp::CreateActor {
            record: record("a2", "k"),
            input: None,
            mode: CreateMode::GetOrCreate,
            reply,
        })
        .unwrap();
    go.send(()).unwrap();
    first.join().unwrap();
    let (made, was_created) = created.await.unwrap().unwrap();
    assert!(deleted.recv().unwrap());
    assert_eq!((made.id.as_str(), was_created), ("a2", true));
    assert_eq!(store.find_by_key("counter", "k").unwrap().unwrap().id, "a2");
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_damage_is_seen_a_creation_of_an_existing_key_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer, handle) = writer_with_actor(&dir).await;
    store
        .integrity()
        .observe(crate::error::Error::corrupt("seen by a test"));
    let err = handle
        .create_actor(record("a2", "k"), None, CreateMode::GetOrCreate)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "corrupt");
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_relaxed_durability_each_open_counts_once_and_commits_leave_the_counter_alone() {
    use crate::storage::integrity::{self, Mark};
    use crate::storage::store::DB_FILE;
    let dir = tempfile::tempdir().unwrap();
    let mark_path = dir.path().join(integrity::COMMITS_FILE);
    let seq_of = |store: &Store| integrity::commit_seq(&store.connect(false).unwrap()).unwrap();
    let (store, writer, handle) = writer_with_actor(&dir).await;
    let opened = seq_of(&store);
    assert_eq!(opened, 1, "the first open counts once");
    let recorded = Mark {
        seq: opened,
        relaxed: true,
    };
    assert_eq!(integrity::read_mark(&mark_path).unwrap(), Some(recorded));
    let log = Arc::new(Mutex::new(Vec::new()));
    for op in 1..=5 {
        handle.commit("a1".into(), state(op), None, noting(&log, op), false);
    }
    handle.flush().await.unwrap();
    assert_eq!(log.lock().len(), 5);
    assert_eq!(
        seq_of(&store),
        opened,
        "relaxed commits leave the counter alone"
    );
    writer.close().await;
    drop(store);
    // A copy of the files as they are now, before the next open.
    let files = [DB_FILE.to_string(), format!("{DB_FILE}-wal")];
    let copy = tempfile::tempdir().unwrap();
    for file in &files {
        if dir.path().join(file).exists() {
            std::fs::copy(dir.path().join(file), copy.path().join(file)).unwrap();
        }
    }
    let store = Store::open(dir.path(), Durability::Relaxed).unwrap();
    assert_eq!(seq_of(&store), opened + 1, "the next open counts once more");
    assert_eq!(store.load("a1").unwrap().unwrap().state, Some(vec![5]));
    drop(store);
    // The copy is behind the record that open wrote: what the next open reports as commits
    // the log lost (a warning, with relaxed durability), as a count per commit would.
    for file in &files {
        let _ = std::fs::remove_file(dir.path().join(file));
        if copy.path().join(file).exists() {
            std::fs::copy(copy.path().join(file), dir.path().join(file)).unwrap();
        }
    }
    let mark = integrity::read_mark(&mark_path).unwrap().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    assert!(integrity::commit_seq(&conn).unwrap() < mark.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_syncs_each_commit_as_its_durability_says() {
    // docs/configuration.md: `full` is SQLite's `synchronous = FULL` (2), which survives a
    // power loss; `relaxed` is `NORMAL` (1). Checked on the writer's own connection after
    // commits, inline and queued, since every commit goes through it.
    for (durability, expected) in [(Durability::Full, 2), (Durability::Relaxed, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let (_store, writer, handle) = writer_with_actor_at(&dir, durability).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        handle.commit("a1".into(), state(1), None, noting(&log, 1), true);
        handle.commit("a1".into(), state(2), None, noting(&log, 2), false);
        handle.flush().await.unwrap();
        let sync: i64 = handle.with_writer_conn(|conn| {
            conn.query_row("PRAGMA synchronous", [], |row| row.get(0))
                .unwrap()
        });
        assert_eq!(sync, expected, "{durability:?}");
        writer.close().await;
    }
}
