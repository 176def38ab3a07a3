//! An actor's mailbox: a bounded queue with many senders (the actor's handles) and one
//! receiver (its task).
//!
//! Every awake actor has one, and an actor rarely has more than one message queued, so it
//! holds no room for messages until one arrives: one allocation of about 100 bytes, a
//! `VecDeque` that grows with what is queued (and gives its room back once empty after a
//! burst), a lock, and one `Notify`. tokio's bounded channel, used before, allocated about
//! 800 bytes per actor at its start (its first block of 32 slots and a channel padded for
//! cache lines).
//!
//! It behaves as tokio's did where keel relies on it:
//! - [`MailSender::try_send`] fails with [`TrySend::Full`] at the capacity and
//!   [`TrySend::Closed`] once the receiver closed the mailbox or is gone, handing the
//!   message back;
//! - [`MailReceiver::recv`] gives messages in the order they were sent, and `None` once the
//!   mailbox is closed (or every sender is gone) and empty; it is cancel-safe (a `recv`
//!   dropped before it resolved loses no message);
//! - dropping the receiver closes the mailbox and drops what is queued, so each queued
//!   message's reply channel tells its caller the actor stopped.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Past this many slots, an empty queue gives its room back.
const KEPT_SLOTS: usize = 8;

/// Why [`MailSender::try_send`] refused a message; it comes back with the refusal.
pub(crate) enum TrySend<T> {
    /// The mailbox holds its capacity already.
    Full(T),
    /// The receiver closed the mailbox, or is gone.
    Closed(T),
}

impl<T> std::fmt::Debug for TrySend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrySend::Full(_) => "mailbox full",
            TrySend::Closed(_) => "mailbox closed",
        })
    }
}

struct Queue<T> {
    mail: VecDeque<T>,
    closed: bool,
    senders: usize,
}

impl<T> Queue<T> {
    /// The first message, if any; an emptied queue gives back room grown past [`KEPT_SLOTS`].
    fn pop(&mut self) -> Option<T> {
        let mail = self.mail.pop_front();
        if self.mail.is_empty() && self.mail.capacity() > KEPT_SLOTS {
            self.mail = VecDeque::new();
        }
        mail
    }
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// Wakes the receiver: a message arrived, or the last sender left. Its stored permit
    /// covers a send made between the receiver's look at the queue and its wait.
    changed: Notify,
    capacity: usize,
}

/// A new mailbox that holds at most `capacity` messages (at least one).
pub(crate) fn mailbox<T>(capacity: usize) -> (MailSender<T>, MailReceiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            mail: VecDeque::new(),
            closed: false,
            senders: 1,
        }),
        changed: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        MailSender {
            shared: shared.clone(),
        },
        MailReceiver { shared },
    )
}

/// The sending side; cloned for every handle of the actor.
pub(crate) struct MailSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> MailSender<T> {
    /// Queues `mail` without waiting, or hands it back with why not.
    pub(crate) fn try_send(&self, mail: T) -> Result<(), TrySend<T>> {
        {
            let mut queue = self.shared.queue.lock();
            if queue.closed {
                return Err(TrySend::Closed(mail));
            }
            if queue.mail.len() >= self.shared.capacity {
                return Err(TrySend::Full(mail));
            }
            queue.mail.push_back(mail);
        }
        self.shared.changed.notify_one();
        Ok(())
    }

    /// The most messages the mailbox holds.
    pub(crate) fn max_capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Whether the receiver closed the mailbox, or is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.queue.lock().closed
    }
}

impl<T> Clone for MailSender<T> {
    fn clone(&self) -> Self {
        self.shared.queue.lock().senders += 1;
        MailSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for MailSender<T> {
    fn drop(&mut self) {
        let last = {
            let mut queue = self.shared.queue.lock();
            queue.senders -= 1;
            queue.senders == 0
        };
        if last {
            self.shared.changed.notify_one();
        }
    }
}

/// The receiving side, held by the actor's task.
pub(crate) struct MailReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> MailReceiver<T> {
    /// The next message; `None` once the mailbox is closed (or every sender is gone) and
    /// empty. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut queue = self.shared.queue.lock();
                if let Some(mail) = queue.pop() {
                    return Some(mail);
                }
                if queue.closed || queue.senders == 0 {
                    return None;
                }
            }
            self.shared.changed.notified().await;
        }
    }

    /// Whether no message is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.shared.queue.lock().mail.is_empty()
    }

    /// The next message if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        self.shared.queue.lock().pop()
    }

    /// Refuses further messages; those queued can still be received.
    pub(crate) fn close(&mut self) {
        self.shared.queue.lock().closed = true;
    }
}

impl<T> Drop for MailReceiver<T> {
    fn drop(&mut self) {
        // Dropped outside the lock: a message's drop answers its caller.
        let queued = {
            let mut queue = self.shared.queue.lock();
            queue.closed = true;
            std::mem::take(&mut queue.mail)
        };
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    /// A message whose channel tells, once the message is dropped unanswered.
    type Mail = Box<oneshot::Sender<()>>;

    fn mail() -> (Mail, oneshot::Receiver<()>) {
        let (reply, rx) = oneshot::channel();
        (Box::new(reply), rx)
    }

    fn marker(mail: &Mail) -> usize {
        std::ptr::from_ref::<oneshot::Sender<()>>(mail) as usize
    }

    #[tokio::test]
    async fn messages_arrive_in_order_up_to_the_capacity() {
        let (tx, mut rx) = mailbox::<Mail>(2);
        let (first, _a) = mail();
        let (second, _b) = mail();
        let (third, _c) = mail();
        let (one, two) = (marker(&first), marker(&second));
        tx.try_send(first).unwrap();
        tx.clone().try_send(second).unwrap();
        assert!(matches!(tx.try_send(third), Err(TrySend::Full(_))));
        assert_eq!(tx.max_capacity(), 2);
        assert_eq!(marker(&rx.recv().await.unwrap()), one);
        assert_eq!(marker(&rx.recv().await.unwrap()), two);
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_closed_mailbox_refuses_new_mail_and_drains_what_it_holds() {
        let (tx, mut rx) = mailbox::<Mail>(4);
        let (queued, _a) = mail();
        let (late, _b) = mail();
        tx.try_send(queued).unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(late), Err(TrySend::Closed(_))));
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_mail_and_when_the_last_sender_goes() {
        let (tx, mut rx) = mailbox::<Mail>(4);
        let waiting = tokio::spawn(async move {
            let got = rx.recv().await.is_some();
            let end = rx.recv().await.is_none();
            (got, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (one, _a) = mail();
        let other = tx.clone();
        tx.try_send(one).unwrap();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(other);
        let (got, end) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the receiver was not woken")
            .unwrap();
        assert!(got && end);
    }

    #[tokio::test]
    async fn a_recv_given_up_loses_no_message() {
        let (tx, mut rx) = mailbox::<Mail>(4);
        // Started and dropped before anything arrived.
        assert!(tokio::time::timeout(Duration::from_millis(10), rx.recv())
            .await
            .is_err());
        let (one, _a) = mail();
        let sent = marker(&one);
        tx.try_send(one).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(marker(&got), sent);
    }

    #[tokio::test]
    async fn dropping_the_receiver_closes_and_answers_what_was_queued() {
        let (tx, rx) = mailbox::<Mail>(4);
        let (queued, answer) = mail();
        tx.try_send(queued).unwrap();
        drop(rx);
        assert!(tx.is_closed());
        // The message was dropped unanswered: its caller hears so (as `actor.stopped`).
        assert!(answer.await.is_err());
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_back_its_room_after_a_burst() {
        let (tx, mut rx) = mailbox::<Mail>(64);
        let mut answers = Vec::new();
        for _ in 0..64 {
            let (one, answer) = mail();
            answers.push(answer);
            tx.try_send(one).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert!(rx.shared.queue.lock().mail.capacity() <= KEPT_SLOTS);
    }
}
