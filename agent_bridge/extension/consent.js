// The vibe agent's consent window: one page's request (origin as the browser named it,
// the scopes in words, the name the page gave as its own claim). Only the person, on this
// extension page, can answer it; no web page can reach or frame it.

const $ = (id) => document.getElementById(id);
const id = location.hash.slice(1);

async function ask(type, fields = {}) {
  const answer = await chrome.runtime.sendMessage({ type, ...fields });
  if (!answer) throw new Error("The vibe agent did not answer.");
  if (answer.error) throw Object.assign(new Error(answer.error.message), { code: answer.error.code });
  return answer.result;
}

function fail(error) {
  const p = document.createElement("p");
  p.className = "message error";
  p.role = "alert";
  p.textContent = error.message;
  $("messages").replaceChildren(p);
}

// Keep the service worker awake while the person reads (it holds the request).
const port = chrome.runtime.connect({ name: "consent" });
setInterval(() => port.postMessage("ping"), 20_000);

async function decide(allow) {
  $("allow").disabled = $("deny").disabled = true;
  try {
    await ask("decide", { id, allow });
    window.close();
  } catch (error) {
    fail(error);
  }
}

try {
  const request = await ask("consent", { id });
  $("origin").textContent = request.origin;
  $("name").textContent = request.name ? `It calls itself “${request.name}”; only the address above is checked.` : "";
  $("email").textContent = request.identity.email;
  $("server").textContent = request.identity.server;
  $("scopes").replaceChildren(
    ...request.scopes.map(([sentence, collection]) => {
      const li = document.createElement("li");
      li.textContent = sentence;
      if (collection) {
        const strong = document.createElement("strong");
        strong.textContent = ` ${collection}`;
        li.append(strong);
      }
      return li;
    }),
  );
  $("request").hidden = false;
  $("allow").addEventListener("click", () => decide(true));
  $("deny").addEventListener("click", () => decide(false));
  $("allow").focus();
} catch (error) {
  fail(error);
}
