// Uses every export of vibe-react; `tsc -p web/typecheck` checks web/react/index.d.ts.
import { createVibe, type Doc } from "vibe-sdk";
import { useCollection, useDocument, useIdentity, useVibe, VibeProvider } from "vibe-react";

interface Note extends Doc {
  title: string;
}

const client = createVibe({ server: "https://vibe.example.org", scopes: ["data:write:notes"] });

function Notes() {
  const vibe = useVibe();
  const { state, identity, login, logout } = useIdentity();
  const { docs, loading, error } = useCollection<Note>("notes", { query: { done: false }, sort: ["title"], limit: 50 });
  const first = useDocument<Note>("notes", docs[0]?._id);
  if (state !== "logged-in") return <button onClick={() => login()}>Log in</button>;
  return (
    <div>
      <p>{identity?.id}</p>
      {loading ? <p>Loading</p> : null}
      {error ? <p>{error.message}</p> : null}
      <ul>{docs.map((note) => <li key={note._id}>{note.title}</li>)}</ul>
      <p>{first.doc?.title}</p>
      <button onClick={() => vibe.collection("notes").create({ title: "new" })}>Add</button>
      <button onClick={() => logout()}>Log out</button>
    </div>
  );
}

export function App() {
  return (
    <VibeProvider client={client}>
      <Notes />
    </VibeProvider>
  );
}
