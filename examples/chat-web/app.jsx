// The chat page: one React component on keel/react. The name comes from `?name=`.
import { useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { createKeel } from "keel/react";

const keel = createKeel(window.KEEL_URL);
const name = new URLSearchParams(location.search).get("name") || `guest-${Math.floor(Math.random() * 1000)}`;

function Chat() {
  const room = keel.useActor({ name: "room", key: ["lobby"], params: { name } });
  const [lines, setLines] = useState([]);
  const [statuses, setStatuses] = useState([]);
  const [draft, setDraft] = useState("");
  const [sendError, setSendError] = useState(undefined);

  useEffect(() => setStatuses((all) => (all.at(-1) === room.status ? all : [...all, room.status])), [room.status]);
  // Each time the connection opens (again), the room's history replaces what the page shows,
  // so messages sent while it was away appear too.
  useEffect(() => {
    if (room.status !== "open") return;
    let current = true;
    room.connection.history().then((history) => current && setLines(history), () => {});
    return () => {
      current = false;
    };
  }, [room.connection, room.status]);
  keel.useActorEvent(room, "message", (line) => setLines((all) => [...all, line]));
  keel.useActorEvent(room, "joined", (who) => setLines((all) => [...all, `* ${who} joined`]));

  const send = (event) => {
    event.preventDefault();
    if (!draft || room.connection === undefined) return;
    setSendError(undefined);
    room.connection.send(draft).catch((err) => setSendError(err.fullCode));
    setDraft("");
  };

  return (
    <main>
      <h1>keel chat: lobby</h1>
      <p>
        You are <b id="name">{name}</b>. Connection:{" "}
        <span id="status" className={`status ${room.status}`}>
          {room.status}
        </span>{" "}
        <small id="statuses">{statuses.join(" → ")}</small>
      </p>
      {room.error && <p className="error" id="error">{room.error.fullCode}: {room.error.message}</p>}
      {sendError && <p className="error">{sendError}</p>}
      <ul id="messages">
        {lines.map((line, i) => (
          <li key={i}>{line}</li>
        ))}
      </ul>
      <form onSubmit={send}>
        <input id="draft" value={draft} onChange={(e) => setDraft(e.target.value)} placeholder="Say something" />
        <button id="send" type="submit" disabled={room.status !== "open"}>
          Send
        </button>
      </form>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<Chat />);
