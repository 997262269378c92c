// The notes example with React and vibe-react. Bundle it (React comes from npm):
//   npx esbuild main.jsx --bundle --format=esm --jsx=automatic --outfile=app.js \
//     --alias:vibe-sdk=../../sdk/vibe.js --alias:vibe-react=../../react/index.js
// then serve index.html + app.js and open it with ?server=http://localhost:3000

import { createRoot } from "react-dom/client";
import { createVibe } from "vibe-sdk";
import { VibeProvider, useCollection, useDocument, useIdentity, useVibe } from "vibe-react";

const server = new URLSearchParams(location.search).get("server") || "http://localhost:3000";
const client = createVibe({
  server,
  scopes: ["data:write:notes"],
  appName: "Notes (React example)",
  redirectUri: `${location.origin}${location.pathname}?server=${encodeURIComponent(server)}`,
});

function Notes() {
  const vibe = useVibe();
  const { state, identity, login, logout } = useIdentity();
  const { docs, loading, error } = useCollection("notes", { limit: 100 });
  const first = useDocument("notes", docs[0]?._id);
  if (state === "loading") return <p>Loading…</p>;
  if (state !== "logged-in") {
    return (
      <button id="login" onClick={() => login()}>
        Log in with Vibe Cloud
      </button>
    );
  }
  return (
    <main>
      <p>
        Logged in as <span id="who">{identity?.id}</span>{" "}
        <button onClick={() => logout()}>Log out</button>
      </p>
      {loading && <p>Loading notes…</p>}
      {error && <p role="alert">{error.message}</p>}
      <ul id="notes">
        {docs.map((note) => (
          <li key={note._id}>{note.title}</li>
        ))}
      </ul>
      <p>
        First note, followed with useDocument: <span id="first">{first.doc?.title}</span>
      </p>
      <button onClick={() => vibe.collection("notes").create({ title: `Note ${docs.length + 1}` })}>
        Add a note
      </button>
    </main>
  );
}

createRoot(document.getElementById("root")).render(
  <VibeProvider client={client}>
    <Notes />
  </VibeProvider>,
);
