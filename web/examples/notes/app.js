// A notes app on another origin than the Vibe Cloud server, using only the browser SDK.
// Serve this folder anywhere (python3 -m http.server 5173) and open
// http://localhost:5173/?server=http://localhost:3000

const params = new URLSearchParams(location.search);
const server = params.get("server") || "http://localhost:3000";
const { createVibe } = await import(`${server}/sdk/vibe.js`);

const $ = (id) => document.getElementById(id);
const vibe = createVibe({
  server,
  scopes: ["data:write:notes"],
  appName: "Notes (example)",
  // Keep ?server= across the round trip to the consent page.
  redirectUri: `${location.origin}${location.pathname}?server=${encodeURIComponent(server)}`,
});
window.notesApp = { vibe }; // for tests and the curious

const notes = vibe.collection("notes");
let stopLive = null;

function show(list, docs) {
  list.replaceChildren(
    ...docs.map((doc) => {
      const item = document.createElement("li");
      item.textContent = doc.title; // textContent: a note's text is never markup
      item.dataset.id = doc._id;
      return item;
    }),
  );
}

function report(error) {
  $("error").hidden = !error;
  const code = error && (error.code || error.type);
  $("error").textContent = error ? error.message + (code ? ` (${code})` : "") : "";
}

function render() {
  const loggedIn = vibe.state === "logged-in";
  $("status").textContent = loggedIn ? "Logged in" : vibe.state === "loading" ? "Loading…" : "Logged out";
  $("who").textContent = loggedIn && vibe.identity ? `as ${vibe.identity.did || vibe.identity.id}` : "";
  $("login").hidden = loggedIn;
  $("logout").hidden = !loggedIn;
  $("app").hidden = !loggedIn;
  if (loggedIn && !stopLive) {
    const live = notes.live({ limit: 200 });
    stopLive = live.watch((snapshot) => {
      show($("notes"), snapshot.docs);
      report(snapshot.error);
    });
  } else if (!loggedIn && stopLive) {
    stopLive();
    stopLive = null;
    show($("notes"), []);
  }
}

vibe.on("state", (state, info) => {
  if (info.reason === "revoked") report(new Error("Access to your notes was revoked. Log in again."));
  render();
});
vibe.on("identity", render);
vibe.on("realtime", (status) => {
  $("realtime").textContent = status;
});

$("login").addEventListener("click", () => vibe.login());
$("logout").addEventListener("click", () => vibe.logout());
$("new-note").addEventListener("submit", async (event) => {
  event.preventDefault();
  const title = $("title").value.trim();
  if (!title) return;
  try {
    await notes.create({ title, createdAt: new Date().toISOString() });
    $("title").value = "";
    report(null);
  } catch (error) {
    report(error);
  }
});
$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const needle = $("needle").value.replace(/[\\^$.*+?()[\]{}|]/g, "\\$&");
  try {
    const page = await notes.query({ title: { $regex: needle } }, { limit: 50 });
    show($("results"), page.docs);
    report(null);
  } catch (error) {
    report(error);
  }
});

try {
  await vibe.init();
} catch (error) {
  report(error);
}
render();
